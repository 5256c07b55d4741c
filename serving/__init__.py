"""biva_serving: the serving step: the `tritonserver` launcher and supervisor (launcher.py) and the python-backend
model code (triton_python/) that biva-export copies into the model repository."""
