"""``serve:`` — the HTTP endpoints: where they listen, how they scale and batch, what they accept."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from visgen.base import Section
from visgen.train.config import AutoOrBool


class ServeLimits(Section):
    """What one request may ask for; anything beyond is answered 4xx before any work is done."""

    max_body_bytes: int = Field(12 << 20, ge=1024, le=1 << 30,
                                description="Largest request body in bytes (JSON or multipart, base64 included).")
    max_image_bytes: int = Field(8 << 20, ge=1024, le=1 << 30,
                                 description="Largest uploaded image file in bytes (after base64 decoding).")
    max_image_pixels: int = Field(16_000_000, ge=64, le=1 << 31,
                                  description="Largest uploaded image in pixels (width x height, read from the header before decoding).")
    image_formats: tuple[Literal["PNG", "JPEG", "WEBP", "GIF", "BMP"], ...] = Field(
        ("PNG", "JPEG", "WEBP"), min_length=1, description="Accepted upload formats (PIL format names).")
    max_prompt_chars: int = Field(500, ge=1, le=100_000, description="Longest prompt in characters.")
    max_n: int = Field(8, ge=1, le=256, description="Most images one generate request may ask for.")
    max_cfg_scale: float = Field(20.0, ge=1.0, le=50.0, description="Largest classifier-free guidance scale accepted.")
    max_temperature: float = Field(5.0, ge=0.0, le=10.0, description="Largest sampling temperature accepted.")
    max_top_k: int = Field(100_000, ge=0, le=1 << 20, description="Largest top_k accepted (0 = all codes is always allowed).")
    max_seed: int = Field(2**31 - 1, ge=0, le=2**47, description="Largest seed accepted (below 2**48, where best-of-n candidates draw).")
    max_candidates: int = Field(16, ge=1, le=64, description=(
        "Most best-of-n candidates a generate request may ask for per image (each costs about one more image), "
        "and a caption request per caption."))


class ServeConfig(Section):
    """Ray Serve app: FastAPI ingress in front of one model deployment (image tokenizer + transformer)."""

    model_uri: str = Field("models:/visgen@champion", min_length=1,
                           description="What to serve: models:/NAME@ALIAS (followed as it moves), models:/NAME/VERSION, a bundle directory, or a bundle's object store URL (s3://bucket/run/models/bundle).")
    host: str = Field("127.0.0.1", min_length=1, description="HTTP host of the Serve proxy (0.0.0.0 to listen on every interface).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy.")
    route_prefix: str = Field("/", pattern=r"^/([A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*)?$",
                              description="URL prefix of the app, e.g. / or /visgen.")
    app_name: str = Field("visgen", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Serve application name.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model replicas run the model.")
    model_num_cpus: float = Field(1.0, ge=0.0, le=256, description="CPUs reserved per model replica (also its torch threads, at least 1).")
    model_num_gpus: float = Field(0.0, ge=0.0, le=8, description="GPUs reserved per model replica.")
    ingress_num_cpus: float = Field(0.1, ge=0.0, le=16, description="CPUs reserved per ingress replica.")
    num_replicas: int = Field(1, ge=1, le=1024, description="Model replicas when autoscaling is off.")
    autoscaling: bool = Field(False, description="Scale model replicas with load between min_replicas and max_replicas.")
    min_replicas: int = Field(1, ge=0, le=1024, description="Fewest model replicas when autoscaling.")
    max_replicas: int = Field(4, ge=1, le=1024, description="Most model replicas when autoscaling.")
    target_ongoing_requests: float = Field(8.0, gt=0, le=10_000,
                                           description="Autoscaling target of in-flight requests per model replica.")
    ingress_replicas: int = Field(1, ge=1, le=1024, description="Ingress (HTTP) replicas.")
    max_batch_size: int = Field(16, ge=1, le=1024, description="Most requests one batched generate/caption call merges; 1 = no batching.")
    batch_wait_timeout_s: float = Field(0.02, ge=0.0, le=10.0,
                                        description="How long a batch waits for more requests before it runs.")
    max_ongoing_requests: int = Field(64, ge=1, le=100_000,
                                      description="In-flight requests per model replica; must exceed max_batch_size so batches can fill.")
    request_timeout_s: float = Field(120.0, gt=0, le=3600, description="A request not answered within this gets 504.")
    poll_interval_s: float = Field(30.0, ge=0.0, le=86_400,
                                   description="How often replicas check whether the alias moved; 0 = never (reconfigure only).")
    token_env: str = Field("VISGEN_SERVE_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                           description="Environment variable holding the bearer token; unset or empty = no authentication.")
    health_check_period_s: float = Field(10.0, gt=0, le=3600, description="How often Serve checks each model replica.")
    health_check_timeout_s: float = Field(30.0, gt=0, le=3600,
                                          description="A model replica whose health check takes longer is replaced.")
    unhealthy_after_failures: int = Field(3, ge=1, le=1000,
                                          description="Consecutive failed model calls (HTTP 500s) after which the replica reports "
                                                      "unhealthy and Serve replaces it.")
    compile_decode: AutoOrBool = Field(
        "auto", description="Compile the transformer's one-token decode steps in each model replica (CUDA graphs on "
                            "a GPU); auto = true when the replica runs on a GPU (compiling on a CPU takes minutes).")
    warmup: AutoOrBool = Field(
        "auto", description="Before a replica (or a reloaded version) takes traffic, generate and caption once at "
                            "batch 1 and at max_batch_size, so no request waits for compilation or graph capture; "
                            "auto = true when the decode steps are compiled.")
    limits: ServeLimits = Field(default_factory=ServeLimits, description="Per-request limits.")

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.max_ongoing_requests <= self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be greater than max_batch_size "
                             f"({self.max_batch_size}), or batches can never fill")
        if self.autoscaling and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        if self.limits.max_image_bytes > self.limits.max_body_bytes:
            raise ValueError(f"limits.max_image_bytes ({self.limits.max_image_bytes}) must not exceed "
                             f"limits.max_body_bytes ({self.limits.max_body_bytes})")
        return self
