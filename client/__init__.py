"""biva_client: typed Python API and `biva-client` CLI over the BIVA models served by Triton.

    from biva_client import BivaClient, Job, load_inputs, score_images
    with BivaClient("127.0.0.1:8001", protocol="grpc") as client:
        x = load_inputs("fashion-mnist:test", client.meta, limit=100)
        table = score_images(client, x, Job(seed=0, batch_size=50, concurrency=2), iw=8, ks=(1, 2))
"""
from .api import (BivaClient, ClientError, Encoding, InputError, ModelMeta, ModelNotReady, RequestTimeout, Scores,
                  ServerBusy, ServerError, ServerUnavailable)
from .tasks import (Job, ScoreTable, encode_images, load_inputs, reconstruct, regenerate_latents, sample_images,
                    score_images)

__all__ = [
    "BivaClient", "ClientError", "Encoding", "InputError", "ModelMeta", "ModelNotReady", "RequestTimeout", "Scores",
    "ServerBusy", "ServerError", "ServerUnavailable", "Job", "ScoreTable", "encode_images", "load_inputs",
    "reconstruct", "regenerate_latents", "sample_images", "score_images",
]
