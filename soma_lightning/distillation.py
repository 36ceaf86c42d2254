"""Knowledge distillation (Hinton et al., 2015): the student's loss gains weight x KL(teacher || student) on the
next-token distributions, both softened by a temperature. The teacher is any model `soma_lightning.load` reads,
of the student's token ids; it runs frozen beside the student and is no part of the student's state dict,
optimizer, checkpoints or sharding."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from soma_lightning.errors import UserError
from soma_lightning.vocabulary import Vocabulary


@dataclass
class DistillConfig:
    """The distillation term of the objective: training loss = CE + weight x KL (+ the objective's other terms).

    Args:
        teacher: what `soma_lightning.load` reads: a run directory (its last.ckpt), a .ckpt file or a
            `soma-lightning export` .safetensors file, of any spec with the student's vocabulary (tokenizer and
            EOS) and at least its vocab_size (a larger one is compared on the student's ids only). It is loaded
            when a fit starts; the path is a hyper-parameter, so a resumed run loads it again.
        weight: the KL term's weight, >= 0, beside the CE's 1 ("CE + weighted KL"); 0 is the plain objective.
        temperature: both distributions are softmax(logits / temperature), > 0; the KL is multiplied by
            temperature^2, which keeps its gradients' scale as the temperature changes.
    """

    teacher: str
    weight: float = 0.5
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise UserError(f"model.distill.weight: expected a number >= 0, got {self.weight}")
        if not self.temperature > 0:
            raise UserError(f"model.distill.temperature: expected a number > 0, got {self.temperature}")


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, pad: int, temperature: float) -> Tensor:
    """temperature^2 x KL(softmax(teacher / temperature) || softmax(student / temperature)) in nats, in float32,
    averaged over the positions whose target is not `pad`. Logits [B, T, V] (the teacher's may have more ids:
    its distribution is taken over the student's V), targets [B, T]. Gradients reach the student only."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[..., : student_logits.shape[-1]].detach().float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="none", log_target=True).sum(dim=-1)
    keep = targets != pad  # a mask, not an index: indexing would wait for the device to count the positions
    return (kl * keep).sum() / keep.sum().clamp(min=1) * temperature**2


def load_teacher(config: DistillConfig, vocabulary: Vocabulary, vocab_size: int, device: torch.device) -> nn.Module:
    """The teacher's network on `device`, in eval mode, without gradients; a one-line UserError when it cannot
    be read or does not score the student's ids (`vocabulary`, `vocab_size`) as the same tokens."""
    from soma_lightning.loading import load  # it imports SomaLM, which imports this module

    try:
        teacher = load(config.teacher, device=str(device))
    except UserError as e:
        raise UserError(f"model.distill.teacher: {str(e).removeprefix('path: ')}") from None
    if teacher.vocabulary.identity != vocabulary.identity:
        raise UserError(
            f"model.distill.teacher: {config.teacher} has the vocabulary {teacher.vocabulary.describe()}, the student "
            f"{vocabulary.describe()}; expected a teacher of the student's token ids"
        )
    if teacher.arch.vocab_size < vocab_size:
        raise UserError(
            f"model.distill.teacher: {config.teacher} has vocab_size {teacher.arch.vocab_size}, expected at least the "
            f"student's model.arch.vocab_size {vocab_size}"
        )
    return teacher.model.requires_grad_(False).eval()
