"""Attention regulation (arXiv 2403.06381; authors' code YaNgZhAnG-V5/attention_regulation),
METHODS.md §4.

On a selected cross-attention layer, for the first cond row of every image with target columns,
a pre-softmax bias on the target columns is optimised so that every target gets enough attention:
Gaussian bumps on the map grid weighted by θ (one weight per head, bump and target), 20 plain
gradient steps from a random start (step size scaled by the rows, as the authors do), the best
iterate kept, blended with this layer's previous-step bias, scaled by decay^step; the edited scores
are cast to float16 and the start-of-text and end-of-text probabilities are restored to their
unedited values (the authors' quirk: rows then no longer sum to 1).

The gradient is analytic (no autograd, so it runs under `torch.inference_mode()`): only the target
columns change, so the softmax needs only the log-sum-exp of the other columns, computed once. The
loss is per image (each image is optimised as the authors optimise a batch of one), images with the
same number of targets are batched, and the keep-best selection is done with `torch.where` so the
per-step path never synchronises with the device.

With "Show diagnostics" on (`map_log`), each regulated layer also keeps, per image, the
head-averaged maps of the target columns before (plain softmax) and after (with the bias) on the
device; `map_capture` averages the layers of the image's last regulated step for its picture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..attention import attention, attention_scores, merge_heads, select_rows, split_heads
from ..engine import schedule_index
from ..prompt_model import ColumnSpan, span_at

QUANTILE = 0.9
QUANTILE_TARGET = 0.9
SHARE_WEIGHT = 80.0
THETA_WEIGHT = 0.09


def bump_sigma(map_size: tuple[int, int]) -> int:
    """σ = side // 16 (the authors' rule), at least 1 for maps narrower than 16."""
    return max(1, min(map_size) // 16)


def bump_basis(map_size: tuple[int, int], device=None) -> torch.Tensor:
    """Gaussian bumps (K, h·w) float32: centres at 2σ, 4σ, … < side on each axis; k = a·r_y + b
    with a the column (x) centre (outer loop) and b the row (y) centre (inner loop);
    exp(−((x − x0)² + (y − y0)²)/(2σ²)), unnormalised."""
    h, w = map_size
    sigma = bump_sigma(map_size)
    ys = torch.arange(h, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, -1)
    bumps = [
        torch.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * sigma**2))
        for x0 in range(2 * sigma, w, 2 * sigma)
        for y0 in range(2 * sigma, h, 2 * sigma)
    ]
    if not bumps:
        return torch.zeros(0, h * w, device=device)
    return torch.stack(bumps).reshape(len(bumps), h * w).to(device)


def target_columns(scores: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """scores[..., targets] without a device index tensor."""
    return torch.stack([scores[..., t] for t in targets], dim=-1)


def other_logsumexp(scores: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """log Σ exp over the columns that are not targets: (..., M) → (..., 1)."""
    masked = scores.clone()
    for t in targets:
        masked[..., t] = float("-inf")
    return masked.logsumexp(dim=-1, keepdim=True)


@dataclass
class OptimiseResult:
    best_bias: torch.Tensor  # (rows, N, n_t): Σ_k G_k θ of the best iterate
    best_loss: torch.Tensor  # (images,)
    losses: list | None = None  # per iteration (images,) tensors, when recorded
    weights: list | None = None  # per iteration θ (rows, K, n_t), when recorded


def optimise_bias(
    target_scores: torch.Tensor,
    lse_other: torch.Tensor,
    basis: torch.Tensor,
    theta: torch.Tensor,
    heads: int,
    iterations: int = 20,
    step_size: float = 100.0,
    record: bool = False,
) -> OptimiseResult:
    """Gradient descent on θ (rows, K, n_t), rows = images·heads (image-major).

    target_scores (rows, N, n_t) and lse_other (rows, N, 1) are float32; basis (K, N).
    Loss per image, with A = softmax(S0 + B)[targets] over the image's heads:
    mean (q0.9(A) − 0.9)² + 80·mean (Σ_N A/N − min(1, 0.2·n_t)/n_t)² + 0.09·mean θ²;
    θ ← θ − heads·step_size·∇θ; the best (strictly lowest) evaluated iterate is kept."""
    rows, positions, n_targets = target_scores.shape
    images = rows // heads
    share = min(1.0, 0.2 * n_targets) / n_targets
    rank = QUANTILE * (positions - 1)
    below = int(rank)
    above = min(below + 1, positions - 1)
    frac = rank - below
    at_below, at_above = positions - 1 - below, positions - 1 - above
    per_image = heads * n_targets
    theta_count = heads * basis.shape[0] * n_targets
    best_loss = torch.full((images,), float("inf"), device=theta.device)
    best_theta = theta
    losses, weights = ([], []) if record else (None, None)
    for iteration in range(iterations):
        bias = torch.einsum("rkt,kn->rnt", theta, basis)
        shifted = target_scores + bias
        log_z = torch.logaddexp(lse_other, shifted.logsumexp(dim=-1, keepdim=True))
        probs = torch.exp(shifted - log_z)  # (rows, N, n_t)
        # only the top of the order matters for the 0.9 quantile: topk, not a full sort
        top, order = probs.topk(positions - below, dim=1)  # descending: ascending rank r sits at N-1-r
        quantile = torch.lerp(top[:, at_below], top[:, at_above], frac)  # (rows, n_t); a Python weight: no copy
        mean = (probs / positions).sum(dim=1)  # (rows, n_t)
        q_err = quantile - QUANTILE_TARGET
        m_err = mean - share
        theta_sq = theta.pow(2).reshape(images, -1)
        loss = (
            q_err.pow(2).reshape(images, -1).mean(1)
            + SHARE_WEIGHT * m_err.pow(2).reshape(images, -1).mean(1)
            + THETA_WEIGHT * theta_sq.mean(1)
        )
        if record:
            losses.append(loss)
            weights.append(theta)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_theta = torch.where(better.repeat_interleave(heads).view(-1, 1, 1), theta, best_theta)
        if iteration == iterations - 1:
            break  # the authors' last update is never evaluated
        grad_probs = torch.zeros_like(probs)
        g_q = 2 * q_err / per_image  # (rows, n_t)
        grad_probs.scatter_add_(1, order[:, at_below : at_below + 1], (g_q * (1 - frac)).unsqueeze(1))
        grad_probs.scatter_add_(1, order[:, at_above : at_above + 1], (g_q * frac).unsqueeze(1))
        grad_probs = grad_probs + (SHARE_WEIGHT * 2 * m_err / (per_image * positions)).unsqueeze(1)
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True))
        grad_theta = torch.einsum("kn,rnt->rkt", basis, grad_scores) + THETA_WEIGHT * 2 * theta / theta_count
        theta = theta - (heads * step_size) * grad_theta
    return OptimiseResult(
        best_bias=torch.einsum("rkt,kn->rnt", best_theta, basis),
        best_loss=best_loss,
        losses=losses,
        weights=weights,
    )


def edited_scores(scores: torch.Tensor, targets: Sequence[int], bias: torch.Tensor) -> torch.Tensor:
    """scores (rows, N, M) float32 plus `bias` (rows, N, n_t) on the target columns, cast to
    float16 as the authors write them back."""
    edited = scores.clone()
    for i, t in enumerate(targets):
        edited[..., t] += bias[..., i]
    return edited.to(torch.float16)


def edited_probabilities(edited: torch.Tensor, scores: torch.Tensor, restore: Sequence[int]) -> torch.Tensor:
    """softmax over M of the edited float16 scores; the `restore` columns (start and end of text)
    take the unedited softmax of `scores` (the authors' quirk)."""
    probs = edited.float().softmax(dim=-1)
    if restore:
        plain = scores.softmax(dim=-1)
        for c in restore:
            probs[..., c] = plain[..., c]
    return probs


def restored_columns(targets: Sequence[int], eos: int | Sequence[int] | None) -> list[int]:
    """The columns whose unedited probabilities are put back: start-of-text and end-of-text
    (METHODS.md §4.4, the authors' quirk), unless they are targets."""
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return [c for c in dict.fromkeys([0, *eos]) if c not in targets]


@dataclass
class StepMaps:
    """One image's target maps at one step, while diagnostics are on: per layer that applied a bias,
    its map size and the head-averaged target columns (N, n_t) before and after, on the device."""

    step: int
    columns: tuple[int, ...]
    layers: dict = field(default_factory=dict)  # layer -> (map size, before, after)


def head_averaged_targets(probs: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """(heads, N, M) probabilities → their target columns averaged over the heads (N, n_t)."""
    return target_columns(probs, targets).mean(dim=0)


def representative_maps(layers: Mapping) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor, int]:
    """The map size most of the layers have (ties: the larger map), and the mean over those layers
    of the before and after maps (N, n_t), with their count; device work only, no host read."""
    by_size: dict[tuple[int, int], list] = {}
    for size, before, after in layers.values():
        by_size.setdefault(size, []).append((before, after))
    size = max(by_size, key=lambda s: (len(by_size[s]), s[0] * s[1]))
    chosen = by_size[size]
    before = torch.stack([pair[0] for pair in chosen]).mean(dim=0)
    after = torch.stack([pair[1] for pair in chosen]).mean(dim=0)
    return size, before, after, len(chosen)


@dataclass(frozen=True)
class AttentionMapCapture:
    """One image's target maps for the diagnostics picture: the layer-averaged, head-averaged
    attention of each target column before and after regulation at one step, kept on the device
    until the picture is drawn (`record` reads them in one copy)."""

    step: int
    total_steps: int
    map_size: tuple[int, int]
    columns: tuple[int, ...]
    labels: Mapping[int, str]  # target column → the phrase it belongs to, where known
    layers: int
    before: torch.Tensor  # (h·w, n_t)
    after: torch.Tensor  # (h·w, n_t)

    def record(self, title: str = ""):
        """The `diagnostics.AttentionMapRecord` of this capture."""
        from ..diagnostics import AttentionMapRecord, TargetMaps

        before, after = torch.stack([self.before, self.after]).float().tolist()
        h, w = self.map_size
        targets = tuple(
            TargetMaps(column, self.labels.get(column, ""), grid_of(before, t, h, w), grid_of(after, t, h, w))
            for t, column in enumerate(self.columns)
        )
        return AttentionMapRecord(title, self.step, self.total_steps, self.layers, targets)


def grid_of(rows: Sequence[Sequence[float]], target: int, h: int, w: int) -> tuple[tuple[float, ...], ...]:
    """Target `target`'s column of (h·w, n_t) nested lists as an h × w grid (row-major positions)."""
    return tuple(tuple(rows[y * w + x][target] for x in range(w)) for y in range(h))


@dataclass
class _LayerState:
    step: int
    best: torch.Tensor  # (heads, N, n_t) raw best bias of that step
    previous: torch.Tensor  # the blend partner used at that step


class AttentionRegulator:
    """Per-run state of attention regulation: targets, seeds, schedule and per-layer biases."""

    def __init__(
        self,
        targets: Sequence[Sequence[int]],
        seeds: Sequence[int],
        end: float = 0.5,
        iterations: int = 20,
        step_size: float = 100.0,
        previous_weight: float = 0.25,
        decay: float = 0.99,
        layers: str = "last down + first up",
        eos_columns: Sequence[int | Sequence[int] | None] | None = None,
        spans: Sequence[Sequence[ColumnSpan]] | None = None,
    ):
        self.targets = [list(dict.fromkeys(int(t) for t in image_targets)) for image_targets in targets]
        self.seeds = [int(s) for s in seeds]
        if len(self.seeds) != len(self.targets):
            raise ValueError(f"{len(self.seeds)} seeds for {len(self.targets)} images")
        self.end = end
        self.iterations = int(iterations)
        self.step_size = float(step_size)
        self.previous_weight = float(previous_weight)
        self.decay = float(decay)
        self.layers = layers
        eos_columns = [None] * len(self.targets) if eos_columns is None else eos_columns
        self.restore = [restored_columns(t, eos) for t, eos in zip(self.targets, eos_columns, strict=True)]
        # per image, the target and end-of-text columns of each step segment of its first cond row
        # (prompt_model.ColumnSpan); they replace `targets`/`restore` at every step when given
        self.spans = [list(image_spans) for image_spans in spans] if spans is not None else None
        self._span_step: int | None = None
        self.initial_weights: dict | None = None  # {(layer key, image): θ0 (heads, K, n_t)}, for tests
        self.record: dict | None = None  # set to {} to keep each call's intermediates
        self._generators: dict[tuple[int, torch.device], torch.Generator] = {}
        self._state: dict[tuple, _LayerState] = {}
        self._bases: dict[tuple, torch.Tensor] = {}
        self.notes: list[str] = []  # for the adapter's report, taken through GuidanceRun.take_notes
        # "acted" counters, counted on the Python side: steps and layers optimised, and the layer
        # optimisations × iterations run (the cost)
        self.steps_optimised: set[int] = set()
        self.layers_optimised: set = set()
        self.layers_shared: set = set()  # layers that applied their block leader's bias
        self.iterations_run = 0
        # layer -> the layer whose bias of the same step it applies instead of optimising its own
        # (set by the router from the layer choice: later transformers of a chosen SDXL block)
        self.leaders: dict = {}
        # with diagnostics on ({} instead of None): per image its last regulated step's target maps,
        # and per image and span (`spans`) {target column: phrase} to name them
        self.map_log: dict[int, StepMaps] | None = None
        self.target_labels: list[list[Mapping[int, str]]] | None = None
        self.total_steps = 0

    @classmethod
    def from_settings(
        cls,
        settings,
        targets: Sequence[Sequence[int]],
        seeds: Sequence[int],
        eos_columns: Sequence[int | Sequence[int] | None] | None = None,
        spans: Sequence[Sequence[ColumnSpan]] | None = None,
    ) -> AttentionRegulator:
        return cls(
            targets,
            seeds,
            end=float(settings.regulation_end),
            iterations=int(settings.regulation_iterations),
            step_size=float(settings.regulation_step_size),
            previous_weight=float(settings.regulation_previous_weight),
            decay=float(settings.regulation_decay),
            layers=str(settings.regulation_layers),
            eos_columns=eos_columns,
            spans=spans,
        )

    def at_step(self, step: int) -> None:
        """Takes the targets and restored columns of the segments holding `step`; an image whose
        targets change starts its layers' bias history afresh (its old columns mean other words)."""
        if self.spans is None or step == self._span_step:
            return
        self._span_step = step
        for image, image_spans in enumerate(self.spans):
            span = span_at(image_spans, step)
            targets = list(span.columns) if span is not None else []
            if targets != self.targets[image]:
                for key in [key for key in self._state if key[1] == image]:
                    del self._state[key]
            self.targets[image] = targets
            self.restore[image] = restored_columns(targets, span.end_of_text if span is not None else None)

    def active(self, step: int, total_steps: int) -> bool:
        self.at_step(step)
        self.total_steps = total_steps
        return any(self.targets) and step < schedule_index(self.end, total_steps)

    def _generator(self, image: int, device: torch.device) -> torch.Generator:
        key = (image, device)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seeds[image])
            self._generators[key] = generator
        return generator

    def _basis(self, map_size: tuple[int, int], device) -> torch.Tensor:
        key = (tuple(map_size), device)
        basis = self._bases.get(key)
        if basis is None:
            basis = self._bases[key] = bump_basis(map_size, device)
        return basis

    def _initial_theta(self, layer, image: int, shape: tuple, device) -> torch.Tensor:
        given = None if self.initial_weights is None else self.initial_weights.get((layer, image))
        if given is not None:
            return given.to(device=device, dtype=torch.float32)
        return torch.rand(shape, generator=self._generator(image, torch.device(device)), device=device)

    def _shared_probabilities(self, layer, scores, probs, images: Sequence[int], heads: int, step: int, map_size):
        """A follower layer (`leaders`) applies the blended bias its leader found at this step to its
        own scores, without optimising; None when the leader has no bias of this step and shape for
        every image with targets (then the layer optimises its own)."""
        leader = self.leaders.get(layer, layer)
        if leader == layer:
            return None
        pieces = []
        for slot, image in enumerate(images):
            rows, targets = slice(slot * heads, (slot + 1) * heads), self.targets[image]
            if not targets:
                pieces.append(probs[rows])
                continue
            state = self._state.get((leader, image))
            if state is None or state.step != step or state.best.shape != (heads, scores.shape[1], len(targets)):
                return None
            blended = self.previous_weight * state.previous + (1 - self.previous_weight) * state.best
            edited = edited_scores(scores[rows], targets, self.decay**step * blended)
            pieces.append(edited_probabilities(edited, scores[rows], self.restore[image]))
            if self.record is not None:
                self.record[(layer, image)] = {"probs": pieces[-1], "shared_from": leader}
            if self.map_log is not None:
                self._log_maps(layer, image, step, map_size, probs[rows], pieces[-1])
        self.layers_shared.add(layer)
        return torch.cat(pieces)

    def _count(self, layer, step: int) -> None:
        """One layer optimised at `step` (per image group; counted, never read from the device)."""
        self.steps_optimised.add(step)
        self.layers_optimised.add(layer)
        self.iterations_run += self.iterations

    def _fits(self, map_size: tuple[int, int], device) -> bool:
        """Whether one Gaussian bump fits the map (sides of at least 3); else one note: the layer
        keeps its plain attention (no bias can be placed on a 2×2 or smaller map)."""
        if self._basis(map_size, device).shape[0] > 0:
            return True
        h, w = map_size
        self._note(
            f"Attention regulation: some chosen layers have {h}×{w} attention maps at this image size, too small "
            "for one Gaussian bump (3×3 at least); they are not regulated."
        )
        return False

    def _note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def note(self, message: str) -> None:
        """A note from the router (e.g. layers whose maps match no level of the latent), once."""
        self._note(message)

    def _log_maps(self, layer, image: int, step: int, map_size, plain: torch.Tensor, edited: torch.Tensor) -> None:
        """Keep one layer's head-averaged target maps of the image, before (`plain`, its softmax) and
        after (`edited`), both (heads, N, M); a new step replaces the older one's. Device work only;
        a failure stops the log (one note), never the regulation."""
        try:
            current = self.map_log.get(image)
            if current is None or current.step != step:
                current = self.map_log[image] = StepMaps(step, tuple(self.targets[image]))
            columns = current.columns
            current.layers[layer] = (
                tuple(map_size),
                head_averaged_targets(plain, columns),
                head_averaged_targets(edited, columns),
            )
        except Exception as error:  # the picture is optional, the image is not
            self.map_log = None
            self._note(f"diagnostics: attention regulation's maps are not recorded ({type(error).__name__}: {error}).")

    def map_capture(self, image: int) -> AttentionMapCapture | None:
        """What was recorded of image `image` for the diagnostics picture, or None: its targets' maps
        at the last step regulation acted on it, averaged over the heads and over that step's
        regulated layers of the most common map size.

        Why this step and these layers: the last regulated step's bias is the end of the blended
        history (each step's bias carries the previous ones), so it shows where the regulation
        brought the attention, as the UNet used it (blend and decay applied), and keeping only one
        step makes the log's size independent of the step count. The loss is per head but the
        layer's output mixes all heads, so their mean is what the layer attends to; the regulated
        layers share one resolution in the paper's choice (SD1: 16×16 at 512 px), and their mean
        is one map per target instead of five near-copies (other choices mix sizes: the size most
        layers have is kept)."""
        maps = None if self.map_log is None else self.map_log.get(image)
        if maps is None or not maps.layers:
            return None
        size, before, after, count = representative_maps(maps.layers)
        labels = self.labels_at(image, maps.step)
        return AttentionMapCapture(maps.step, self.total_steps, size, maps.columns, labels, count, before, after)

    def labels_at(self, image: int, step: int) -> Mapping[int, str]:
        """{target column: phrase} of the image's span holding `step` ({} when unknown)."""
        if self.target_labels is None or self.spans is None:
            return {}
        for span, labels in zip(self.spans[image], self.target_labels[image], strict=False):
            if span.first_step <= step <= span.last_step:
                return labels
        return {}

    def remember(self, layer, image: int, step: int, best: torch.Tensor) -> None:
        """Sets a layer's raw best bias (heads, N, n_t) of an earlier step (restoring state)."""
        self._state[(layer, image)] = _LayerState(step, best, best)

    def regulate(
        self,
        layer,
        scores: torch.Tensor,
        images: Sequence[int],
        heads: int,
        map_size: tuple[int, int],
        step: int,
    ) -> torch.Tensor:
        """Edited probabilities for the cond rows of `images`: scores (len(images)·heads, N, M)
        float32, image-major. Images without targets get the plain softmax."""
        self.at_step(step)
        basis = self._basis(map_size, scores.device)
        probs = scores.softmax(dim=-1)
        if basis.shape[0] == 0:
            return probs
        shared = self._shared_probabilities(layer, scores, probs, images, heads, step, map_size)
        if shared is not None:
            return shared
        groups: dict[int, list[int]] = {}
        for slot, image in enumerate(images):
            if self.targets[image]:
                groups.setdefault(len(self.targets[image]), []).append(slot)
        decay = self.decay**step
        pieces: dict[int, torch.Tensor] = {}
        for n_targets, slots in groups.items():
            group_scores = torch.cat([scores[s * heads : (s + 1) * heads] for s in slots])
            target_scores = torch.cat(
                [target_columns(scores[s * heads : (s + 1) * heads], self.targets[images[s]]) for s in slots]
            )
            lse = torch.cat(
                [other_logsumexp(scores[s * heads : (s + 1) * heads], self.targets[images[s]]) for s in slots]
            )
            theta = torch.cat(
                [
                    self._initial_theta(layer, images[s], (heads, basis.shape[0], n_targets), scores.device)
                    for s in slots
                ]
            )
            result = optimise_bias(
                target_scores,
                lse,
                basis,
                theta,
                heads,
                self.iterations,
                self.step_size,
                record=self.record is not None,
            )
            self._count(layer, step)
            initial = torch.einsum("rkt,kn->rnt", theta, basis)
            for j, s in enumerate(slots):
                image = images[s]
                best = result.best_bias[j * heads : (j + 1) * heads]
                state = self._state.get((layer, image))
                if state is not None and state.step == step and state.best.shape == best.shape:
                    previous = state.previous
                elif state is not None and state.step < step and state.best.shape == best.shape:
                    previous = state.best
                else:
                    previous = initial[j * heads : (j + 1) * heads]
                self._state[(layer, image)] = _LayerState(step, best, previous)
                blended = self.previous_weight * previous + (1 - self.previous_weight) * best
                plain = group_scores[j * heads : (j + 1) * heads]
                edited = edited_scores(plain, self.targets[image], decay * blended)
                pieces[s] = edited_probabilities(edited, plain, self.restore[image])
                if self.map_log is not None:
                    self._log_maps(layer, image, step, map_size, probs[s * heads : (s + 1) * heads], pieces[s])
                if self.record is not None:
                    self.record[(layer, image)] = {
                        "loss_per_iter": torch.stack([loss[j] for loss in result.losses]),
                        "weights_per_iter": torch.stack([w[j * heads : (j + 1) * heads] for w in result.weights]),
                        "best_loss": result.best_loss[j],
                        "best_additive_raw": best,
                        "ma_attn_used": previous,
                        "best_additive_blended": blended,
                        "edited_scores": edited,
                        "probs": pieces[s],
                    }
        if not pieces:
            return probs
        return torch.cat([pieces.get(s, probs[s * heads : (s + 1) * heads]) for s in range(len(images))])

    def forward(
        self,
        layer,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        heads: int,
        cond_rows: Sequence[tuple[int, int]],
        map_size: tuple[int, int],
        step: int,
        upcast: bool = False,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output with the cond rows `cond_rows` ((row, image) pairs) regulated; other
        rows take the fast path (or `out`, when given). Also returns the head-averaged probabilities
        of the regulated rows (len(cond_rows), N, M), or None when no row was regulated."""
        self.at_step(step)
        if out is None:
            out = attention(q, k, v, heads, upcast)
        rows = [row for row, image in cond_rows if self.targets[image]]
        images = [image for row, image in cond_rows if self.targets[image]]
        if not rows or not self._fits(map_size, q.device):
            return out, None
        scores = attention_scores(select_rows(q, rows), select_rows(k, rows), heads)
        n, h, positions, columns = scores.shape
        probs = self.regulate(layer, scores.reshape(n * h, positions, columns), images, heads, map_size, step)
        probs = probs.reshape(n, h, positions, columns)
        values = split_heads(select_rows(v, rows), heads).float()
        edited = merge_heads(torch.matmul(probs, values)).to(out.dtype)
        out = out.clone()
        for j, row in enumerate(rows):
            out[row] = edited[j]
        return out, probs.mean(dim=1)
