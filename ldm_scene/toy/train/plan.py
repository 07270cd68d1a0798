"""How much of everything the toy world's training runs: :class:`TrainPlan`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..model import ToyArch


@dataclass(frozen=True)
class TrainPlan:
    """How much of everything to train; the defaults fit in well under 2 hours on 2 CPU cores."""

    arch: ToyArch = field(default_factory=ToyArch)
    n_train: int = 10_000
    n_heldout: int = 1_000
    ae_steps: int = 700
    ae_batch: int = 16
    decoder_steps: int = 600
    decoder_batch: int = 32
    decoder_lr: float = 5e-4
    decoder_object_weight: float = 10.0
    # 0 (or the decoder's own width): the decoder stage trains the autoencoder's decoder on. Another
    # N: it trains a fresh decoder N channels wide behind the same frozen encoder (the latents,
    # hence the UNet, stay valid); a wider decoder has more room for the ground's detail, where
    # most of the reconstruction error is.
    decoder_width: int = 0
    labeler_steps: int = 500
    classifier_steps: int = 450
    aux_batch: int = 32
    unet_steps: int = 2_000
    unet_batch: int = 32
    unet_lr: float = 6e-4
    uncond_prob: float = 0.1
    # Share of each UNet batch whose timestep is drawn from the noisiest 40% (t >= 600), where the
    # layout (and so the position word) is decided; 0 draws every timestep uniformly, as SD did.
    unet_high_noise_share: float = 0.0
    # Extra weight of the object's latent cells in the UNet loss (0: plain MSE, as SD). The object
    # covers a few percent of the latent, so orange-vs-red and cylinder-vs-cube cost little in a
    # uniform loss; each cell counts ``1 + unet_object_weight * (its object fraction)``. A 1000-step
    # leg at 10 did not help: orange, drawn as red, went from 26% to 16% right (README, toy model).
    unet_object_weight: float = 0.0
    # Prompt words whose training images are drawn ``unet_oversample_factor`` times as often (comma
    # list, e.g. "cylinder,orange"; an image with two such words counts factor**2). The words the
    # model confuses most (cylinder drawn as cube, orange as red) then get more of the gradient.
    unet_oversample: str = ""
    unet_oversample_factor: float = 2.0
    ema_decay: float = 0.999
    checkpoint_every: int = 100
    seed: int = 0
    # One thread: on a shared 2-core machine, two OpenMP threads stall whenever one core is busy.
    threads: int = 1
    unet_threads: int = 2  # the UNet stage alone, once nothing else runs beside it
    render_processes: int = 2
    # Where the decoder and UNet stages train and the latents are encoded: "cpu", or "cuda" where a
    # GPU is lent. The weights they ship are float32 on CPU either way.
    device: str = "cpu"

    def __post_init__(self) -> None:
        if min(self.n_train, self.n_heldout, self.ae_steps, self.unet_steps) < 1:
            raise ValueError("sizes and step counts must be positive")
        if not 0 <= self.uncond_prob < 1:
            raise ValueError(f"uncond_prob must be in [0, 1), got {self.uncond_prob}")
        if not 0 <= self.unet_high_noise_share <= 1:
            raise ValueError(f"unet_high_noise_share must be in [0, 1], got {self.unet_high_noise_share}")
        if self.unet_object_weight < 0:
            raise ValueError(f"unet_object_weight must be >= 0, got {self.unet_object_weight}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.decoder_batch < 1 or self.decoder_width < 0:
            raise ValueError(f"decoder_batch must be >= 1 and decoder_width >= 0, got {self.decoder_batch}, {self.decoder_width}")
        if self.render_processes < 1:
            raise ValueError(f"render_processes must be >= 1, got {self.render_processes}")
        if self.unet_oversample_factor <= 0:
            raise ValueError(f"unet_oversample_factor must be > 0, got {self.unet_oversample_factor}")
