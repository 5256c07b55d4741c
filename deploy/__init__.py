"""biva_deploy: deployments of the served model beyond one process (deploy/local.py: replicas behind HAProxy on one
machine; deploy/k8s/: the Kubernetes manifests it reads its facts from)."""
