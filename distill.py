"""Token-level distillation added to distilling step-by-step: the teacher's token distributions, not only its text.

With --kd_weight beta > 0 the student trains on

    alpha * label_loss + (1 - alpha) * rationale_loss + beta * kd_loss

kd_loss is weighted like the views: kd_loss = alpha * kd_label + (1 - alpha) * kd_rationale (standard mode: kd_label
alone), where kd_<view> is the mean over the view's target tokens (the tokens its cross-entropy is taken on, LABEL_PAD
left out) of

    temperature**2 * D(teacher_t, student_t)

at each token, teacher-forced on the same targets. student_t = softmax(student logits / temperature); teacher_t =
softmax(teacher log-probabilities / temperature); D is one of DIVERGENCES (--kd_loss). The temperature**2 keeps the
term's gradient the same size whatever the temperature (Hinton et al. 2015).

The teacher's log-probabilities come from a model run in inference mode on the same views (--kd_teacher, OnlineTokens)
or from a store of its top-k log-probabilities per target token (--kd_logits, logit_store.py; TopKTokens): there the
teacher's distribution is its k stored tokens, and the probability it leaves to the others spread evenly over them,
so that every divergence is defined and k = the vocabulary gives exactly the online teacher.

Both loss implementations take the term: the plain one (model_utils.one_pass_per_view) from the full logits
(KdTerm.plain_loss), the fused chunked one (fast_loss.lm_head_loss) chunk by chunk with its gradient
(KdTerm.chunk_loss_and_grad), so no [tokens, vocabulary] tensor is kept.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cli import first_line
from fast_loss import TARGET_STATES
from model_utils import LABEL_PAD, unwrap_peft
from recovery import RunError

if TYPE_CHECKING:
    from logit_store import TopKStore


def forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row of log-probabilities: mass where the teacher puts it (mode covering)."""
    return (teacher.exp() * (teacher - student)).sum(-1)


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) per row of log-probabilities: the student's mass only where the teacher has some
    (mode seeking, MiniLLM)."""
    return (student.exp() * (student - teacher)).sum(-1)


def jsd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per row: the mean of both KLs to the mixture m = (teacher + student) / 2 (GKD's
    with its beta at 0.5); bounded by log 2."""
    mixture = torch.logsumexp(torch.stack([student, teacher]), dim=0) - math.log(2)
    return 0.5 * (teacher.exp() * (teacher - mixture)).sum(-1) + 0.5 * (student.exp() * (student - mixture)).sum(-1)


# --kd_loss name -> divergence of (student log-probabilities, teacher log-probabilities), per row.
DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd,
}
# The least probability a top-k store's teacher leaves to the tokens outside its k (its stored top-k sum to 1 up to
# rounding where k is most of the vocabulary): keeps their log-probability, and so every divergence, finite.
TAIL_MASS_FLOOR = 1e-6


class TeacherTokens(Protocol):
    def log_probs(self, start: int, stop: int) -> torch.Tensor:
        """[stop - start, vocabulary] fp32 log-probabilities (temperature 1) of the teacher at the batch's target
        tokens start..stop, counted view by view, row by row (the order of fast_loss's target states)."""


@dataclass
class OnlineTokens:
    """A teacher run on the batch: its hidden states at the target tokens and its lm_head, logits made per chunk."""

    hidden: torch.Tensor
    head: torch.Tensor

    def log_probs(self, start: int, stop: int) -> torch.Tensor:
        return F.log_softmax((self.hidden[start:stop].to(self.head.dtype) @ self.head.T).float(), dim=-1)


@dataclass
class TopKTokens:
    """A stored teacher: its k most likely tokens' ids and log-probabilities at each target token; the rest of its
    probability spread evenly over the vocabulary's other tokens."""

    ids: torch.Tensor  # [tokens, k]
    top_log_probs: torch.Tensor  # [tokens, k]
    vocabulary: int

    def log_probs(self, start: int, stop: int) -> torch.Tensor:
        ids, top = self.ids[start:stop].long(), self.top_log_probs[start:stop].float()
        others = self.vocabulary - ids.shape[1]
        rest = (1 - top.exp().sum(1)).clamp_min(TAIL_MASS_FLOOR)
        tail = (rest / max(others, 1)).log()
        return tail[:, None].expand(len(ids), self.vocabulary).contiguous().scatter_(1, ids, top)


@dataclass
class KdTerm:
    """beta * kd_loss for one batch: its weight (beta), temperature, divergence and the teacher's tokens."""

    weight: float
    temperature: float
    divergence: str
    teacher: TeacherTokens

    def token_values(self, student_logits: torch.Tensor, start: int) -> torch.Tensor:
        """temperature**2 * D(teacher_t, student_t) at each row of student_logits, the target tokens from start."""
        t = self.temperature
        student = F.log_softmax(student_logits.float() / t, dim=-1)
        teacher = F.log_softmax(self.teacher.log_probs(start, start + len(student_logits)).to(student.device) / t,
                                dim=-1)
        return t * t * DIVERGENCES[self.divergence](student, teacher)

    def loss(self, student_logits: torch.Tensor, start: int, token_weights: torch.Tensor) -> torch.Tensor:
        """weight * sum_i token_weights[i] * token_values[i]: differentiable, from these rows' logits."""
        return self.weight * (self.token_values(student_logits, start) * token_weights.float()).sum()

    def chunk_loss_and_grad(self, logits: torch.Tensor, start: int, token_weights: torch.Tensor, grads: bool):
        """(this chunk's loss, its gradient with respect to the chunk's logits, fp32, or None without grads):
        on the chunk alone, as fast_loss's fused head computes its cross-entropy's. Forward KL from a top-k teacher
        in closed form (top_k_forward_kl); any other, by autograd."""
        if self.divergence == "forward_kl" and isinstance(self.teacher, TopKTokens):
            return self.top_k_forward_kl(logits, start, token_weights, grads)
        with torch.enable_grad():
            chunk = logits.detach().float().requires_grad_(grads)
            loss = self.loss(chunk, start, token_weights)
            grad = torch.autograd.grad(loss, chunk)[0] if grads else None
        return loss.detach(), grad

    def top_k_forward_kl(self, logits: torch.Tensor, start: int, token_weights: torch.Tensor, grads: bool):
        """chunk_loss_and_grad for forward KL from a top-k teacher, without building its dense distribution: the
        teacher's tempered distribution q is its k tokens and one tail value shared by the others, so

            KL(q || s) = sum_k q_k log q_k + others * q_tail log q_tail
                         - sum_k q_k log s_k - q_tail * (sum_all log s - sum_k log s_k)

        with sum_all log s = sum(z) / T - vocabulary * logsumexp(z / T); its gradient is (s - q) / T (times T^2).
        Two passes over the chunk's logits besides the student's softmax."""
        teacher, t = self.teacher, self.temperature
        z = logits.float()
        ids = teacher.ids[start : start + len(z)].long().to(z.device)
        top = teacher.top_log_probs[start : start + len(z)].float().to(z.device)
        others = teacher.vocabulary - ids.shape[1]
        rest = (1 - top.exp().sum(1)).clamp_min(TAIL_MASS_FLOOR)
        tail = (rest / max(others, 1)).log()
        # The tempered teacher, normalised over its k tokens and the others' shared tail.
        tail_total = tail / t + math.log(others) if others else torch.full_like(tail, -math.inf)
        norm = torch.logsumexp(torch.cat([top / t, tail_total[:, None]], dim=1), dim=1)
        q_top_log, q_tail_log = top / t - norm[:, None], tail / t - norm
        q_top, q_tail = q_top_log.exp(), q_tail_log.exp() if others else torch.zeros_like(tail)
        student_norm = torch.logsumexp(z / t, dim=1)
        s_top_log = z.gather(1, ids) / t - student_norm[:, None]
        all_log = (z.sum(1, dtype=torch.float64) / t - teacher.vocabulary * student_norm.double()).float()
        negative_entropy = (q_top * q_top_log).sum(1) + (others * q_tail * q_tail_log if others else 0.0)
        cross = (q_top * s_top_log).sum(1) + q_tail * (all_log - s_top_log.sum(1))
        scale = self.weight * token_weights.float()
        loss = (scale * t * t * (negative_entropy - cross)).sum()
        if not grads:
            return loss, None
        row_scale = (scale * t)[:, None]
        grad = torch.softmax(z / t, dim=1).mul_(row_scale).sub_(q_tail[:, None] * row_scale)
        grad.scatter_add_(1, ids, -(q_top - q_tail[:, None]) * row_scale)
        return loss, grad

    def plain_loss(self, model, outputs, views: list[dict[str, torch.Tensor]], weights: list[float]) -> torch.Tensor:
        """The term from the plain implementation's full logits (one output per view), each view's tokens weighted
        weight / (its token count), as its cross-entropy is."""
        inner = unwrap_peft(getattr(model, "module", model))  # inside a DDP/FSDP/DeepSpeed wrapper, if any
        shifted = not inner.config.is_encoder_decoder  # decoder-only: position i predicts token i + 1
        total, start = 0.0, 0
        for output, view, weight in zip(outputs, views, weights):
            logits, labels = (output.logits[:, :-1], view["labels"][:, 1:]) if shifted else (output.logits,
                                                                                             view["labels"])
            keep = labels != LABEL_PAD
            count = int(keep.sum())
            token_weights = torch.full((count,), weight / max(count, 1), device=logits.device)
            total = total + self.loss(logits[keep], start, token_weights)
            start += count
        return total


def output_rows(model: PreTrainedModel) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_same_vocabulary(teacher_tokenizer: PreTrainedTokenizerBase, teacher_rows: int,
                          student_tokenizer: PreTrainedTokenizerBase, student_rows: int, source: str) -> None:
    """RunError naming source where teacher and student do not share one vocabulary (same token -> id map, same
    number of logits): their distributions over tokens could not be compared."""
    if teacher_rows != student_rows:
        raise RunError(f"{source}: the teacher has {teacher_rows} logits per token and the student {student_rows}; "
                       "token-level distillation needs one vocabulary: choose a teacher of the student's family and "
                       "tokenizer")
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise RunError(f"{source}: the teacher's tokenizer maps tokens to other ids than the student's; "
                       "token-level distillation needs one vocabulary: choose a teacher with the student's tokenizer")


def load_teacher(name: str, student: PreTrainedModel, student_tokenizer: PreTrainedTokenizerBase,
                 source: str = "--kd_teacher") -> PreTrainedModel:
    """The teacher model name (local folder or hub id), in inference mode (eval, no gradients), checked against the
    student: same family, same vocabulary, and a head fast_loss's target states serve (hidden @ lm_head)."""
    from students import family_of, load_pretrained

    try:
        family, tokenizer, teacher = load_pretrained(name)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, UnsupportedStudent, the weight loaders' own errors
        raise RunError(f"could not load {source} {name!r} ({first_line(e)}); pass a local directory holding a "
                       "saved model of the student's family and its tokenizer") from None
    student_family = family_of(unwrap_peft(student).config)
    if family.name != student_family.name:
        raise RunError(f"{source} {name} is a {family.name} model and the student {student_family.name}: choose a "
                       f"{student_family.name} teacher with the student's vocabulary")
    check_same_vocabulary(tokenizer, output_rows(teacher), student_tokenizer, output_rows(unwrap_peft(student)),
                          f"{source} {name}")
    if not family.fast_loss_applies(teacher):
        raise RunError(f"{source} {name}: its logits are not its last hidden states times its lm_head "
                       f"({teacher.config.model_type}); choose a T5-like or Llama-like teacher")
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def online_tokens(teacher: PreTrainedModel, views: list[dict[str, torch.Tensor]]) -> OnlineTokens:
    """The teacher on the batch's views, in inference mode: its states at every target token and its head."""
    device = views[0]["input_ids"].device
    if teacher.device != device:
        teacher.to(device)
    hidden, _, _ = TARGET_STATES[teacher.config.is_encoder_decoder](teacher, views)
    return OnlineTokens(hidden, teacher.get_output_embeddings().weight)


@dataclass
class Distillation:
    """The run's token-level distillation: beta, temperature, divergence and where the teacher's tokens come from
    (teacher: an online model; else the batch's "kd" entry, from a top-k store)."""

    weight: float
    temperature: float
    divergence: str
    vocabulary: int
    teacher: PreTrainedModel | None = None
    store: "TopKStore | None" = None  # logit_store.TopKStore, read by the collator (logit_store.TopKCollator)

    def term(self, batch: dict, views: list[dict[str, torch.Tensor]]) -> KdTerm:
        if self.teacher is not None:
            tokens = online_tokens(self.teacher, views)
        else:
            tokens = TopKTokens(batch["kd"]["ids"], batch["kd"]["log_probs"], self.vocabulary)
        return KdTerm(self.weight, self.temperature, self.divergence, tokens)
