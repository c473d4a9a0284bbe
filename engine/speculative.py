"""Speculative decoding: propose k tokens cheaply, let the target model check them in one pass.

A request in decode carries draft tokens `d1..dk` into the step; the runner feeds
`[t_last, d1, .., dk]` as one query of length k + 1 over the paged cache, so row j's logits are
the target's distribution for the token after `d_j` (row 0: after `t_last`):

    input     | t_last | d1 | d2 | ... | dk |
    logits    |   p0   | p1 | p2 | ... | pk |      p_j scores d_{j+1}; pk gives the bonus token

Accepting n drafts appends `d1..dn` plus one token drawn from p_n (a correction or, when all k
were accepted, the bonus), so a step yields 1..k+1 tokens. The KV of the rejected drafts was
written past `num_computed_tokens`; the scheduler simply does not count it, and the next step
overwrites those slots (the blocks stay with the request, or go back with it).

Proposers: `NgramProposer` (prompt lookup, model-free) and `engine.draft_model.DraftProposer`
(a smaller checkpoint with the same tokenizer on its own paged KV cache; its probabilities q go
to the rejection rule). How many drafts a step proposes is `choose_num_drafts` (below).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

METHODS = ("ngram", "draft")
# The largest verify step with a CUDA graph, in rows. Past a few hundred tokens a target step is
# compute-bound (`saturation_tokens`), so eager launches add little, while a bucket's logits
# ([rows, vocab]: 512 x 128k bf16 is 128 MiB) and activations stay in the graphs' memory pool.
_MAX_GRAPH_ROWS = 512


@dataclass
class SpeculativeConfig:
    """`EngineConfig.speculative`, e.g. `{"method": "ngram", "num_speculative_tokens": 4}` or
    `{"method": "draft", "model": "/path/to/small", "num_speculative_tokens": 4}`."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    # Draft model: a Hugging Face folder with the target's tokenizer (same vocabulary).
    model: str | None = None
    # Blocks of the draft's own KV pool; None: the target's count + max_num_seqs (the draft
    # shares no prefixes and looks k tokens ahead). Its memory is the target's times the ratio
    # of the two models' KV bytes per token.
    draft_num_blocks: int | None = None
    # N-gram lookup: try the longest suffix first, down to the shortest.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # Dynamic speculation (`choose_num_drafts`): never propose while more requests than this
    # decode (a hard cap over the cost rule).
    max_batch_size: int = 32
    # Per step, k from the batch size and the measured acceptance (`choose_num_drafts`); per
    # request, fewer drafts while few are accepted (`num_drafts`). False: always k drafts.
    adaptive: bool = True
    # The cost rule's roofline: tokens per target forward past which a step's time grows with
    # its tokens (below it, weight reads dominate). None: 256 on CUDA, 8 on CPU (measured on
    # the benchmark's models; CPU matmuls are compute-bound almost at once).
    saturation_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"speculative method {self.method!r} is not supported; use one of {METHODS}"
            )
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(
                f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}"
            )
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min}, {self.prompt_lookup_max}"
            )
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if (self.method == "draft") != (self.model is not None):
            raise ValueError(
                "speculative method 'draft' needs 'model' (a draft checkpoint folder), and "
                "only it takes one"
            )
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"draft model {self.model}: no config.json (a Hugging Face folder?)")
        if self.draft_num_blocks is not None and self.draft_num_blocks < 1:
            raise ValueError(f"draft_num_blocks must be >= 1, got {self.draft_num_blocks}")
        if self.saturation_tokens is not None and self.saturation_tokens < 1:
            raise ValueError(f"saturation_tokens must be >= 1, got {self.saturation_tokens}")

    def max_verify_rows(self, max_num_seqs: int) -> int:
        """Rows of the largest verify step the decode CUDA graphs hold: every request that may
        speculate (`max_batch_size`, at most `max_num_seqs`) verifying k drafts as k + 1 rows
        (engine/decode_graphs.py), at most _MAX_GRAPH_ROWS. Larger steps run eagerly."""
        num_seqs = min(max_num_seqs, self.max_batch_size)
        return min(num_seqs * (self.num_speculative_tokens + 1), _MAX_GRAPH_ROWS)

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | None) -> SpeculativeConfig | None:
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative must be a dict or None, got {type(value).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative options {unknown}; known: {sorted(known)}")
        return cls(**value)


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens and
    propose the tokens that followed it (n from `prompt_lookup_max` down to the minimum).

    `propose` searches a token list from scratch (`scan`); `propose_batch` keeps, per running
    request, an index of its n-grams (`_NgramIndex`) that each step extends by the tokens
    appended since the last one, so a lookup costs a few dict probes instead of a scan of the
    whole sequence (a numpy scan took ~170 us a request on an H100 host: 11 ms a step at batch
    64, before the scans kept an array copy of the sequence); a request's first lookups scan
    (see _SCAN_LOOKUPS)."""

    def __init__(self, config: SpeculativeConfig):
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self.sizes = range(self.max_n, self.min_n - 1, -1)
        self._indexes: dict[str, _NgramIndex] = {}
        # Seconds the last `propose_batch` spent building indexes: a one-off per request, not
        # what a step of speculation costs, so the step cost meter leaves it out.
        self.one_off_s = 0.0

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        return scan(token_ids, self.sizes, k)

    def propose_batch(self, requests: list, num_drafts: list[int]) -> None:
        """Set each request's `spec_token_ids` (up to its count of drafts)."""
        self.one_off_s = 0.0
        for request, k in zip(requests, num_drafts):
            request.spec_token_ids = self.lookup(request, k)

    def lookup(self, request, k: int) -> list[int]:
        """Up to k drafts for `request` from its index (its first lookups: scans). The time of
        the lookup that builds the index is added to `one_off_s`."""
        index = self._indexes.get(request.request_id)
        if index is None:
            index = self._indexes[request.request_id] = _NgramIndex(self.min_n, self.max_n)
        if not index.builds_next(request.all_token_ids):
            return index.propose(request.all_token_ids, k)
        start = time.perf_counter()
        drafts = index.propose(request.all_token_ids, k)
        self.one_off_s += time.perf_counter() - start
        return drafts

    def retain(self, running_ids: set[str]) -> None:
        """Drop the indexes of requests no longer running."""
        for rid in [rid for rid in self._indexes if rid not in running_ids]:
            del self._indexes[rid]


class _NgramIndex:
    """One sequence's n-grams for prompt lookup: per n, n-gram -> the latest position where it
    starts, over every n-gram but the sequence's last (`NgramProposer.propose`'s windows).

        tokens   | t0 t1 ... t(L-n-1) | t(L-n) ... t(L-1) |
        indexed  | starts 0 .. L-n-1  |  the suffix: the key looked up

    Growing from L to L' tokens adds the starts L-n .. L'-n-1 (later starts overwrite earlier
    ones: the latest occurrence wins). An index catches up only when it is looked up, so a
    request not proposed for (dynamic speculation) costs nothing until it is again; a long
    catch-up (the prompt, the tokens of a pause) runs in C (`dict.update` over zipped slices:
    2.5x the Python loop's speed; 384 tokens took 0.24 ms on the 2-core CPU dev machine)."""

    def __init__(self, min_n: int, max_n: int):
        self.sizes = range(max_n, min_n - 1, -1)
        self.starts: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.length = 0  # tokens indexed so far
        self.scans = 0  # lookups answered by `scan`, before the index was built
        # The scans' copy of the sequence, extended by the tokens appended since the last scan
        # (converting the whole list took ~27 of a scan's ~48 us at 500 tokens, dev CPU).
        self._array = np.empty(0, dtype=np.int64)
        self._array_length = 0

    def builds_next(self, tokens: list[int]) -> bool:
        """Whether the next lookup builds the index (the scans have cost what a build would)."""
        return self.length == 0 and not self._scans_left(tokens)

    def _scans_left(self, tokens: list[int]) -> bool:
        return self.scans < max(_SCAN_LOOKUPS, int(len(tokens) * _SCAN_LOOKUPS_PER_TOKEN))

    def propose(self, tokens: list[int], k: int) -> list[int]:
        if self.length == 0 and self._scans_left(tokens):
            self.scans += 1
            return scan(tokens, self.sizes, k, self._as_array(tokens))
        length = len(tokens)
        if length < self.length:  # the sequence shrank (never in the engine): start over
            self.starts = {n: {} for n in self.sizes}
            self.length = 0
        short = length - self.length <= _SHORT_CATCH_UP
        for n, table in self.starts.items():
            first, last = max(self.length - n, 0), length - n  # the new starts
            if short:
                for start in range(first, last):
                    table[tuple(tokens[start : start + n])] = start
            elif last > first:
                grams = zip(*[tokens[first + j : last + j] for j in range(n)])
                table.update(zip(grams, range(first, last)))
        self.length = length
        for n in self.sizes:
            if n > length - 1:
                continue
            start = self.starts[n].get(tuple(tokens[length - n :]))
            if start is not None:
                return tokens[start + n : start + n + k]
        return []

    def _as_array(self, tokens: list[int]) -> np.ndarray:
        length = len(tokens)
        if length < self._array_length:  # the sequence shrank (never in the engine)
            self._array_length = 0
        if length > len(self._array):
            grown = np.empty(max(2 * len(self._array), length + 64), dtype=np.int64)
            grown[: self._array_length] = self._array[: self._array_length]
            self._array = grown
        if length > self._array_length:
            self._array[self._array_length : length] = tokens[self._array_length :]
            self._array_length = length
        return self._array[:length]


# Catch-ups of at most this many tokens run as a Python loop (the zipped slices' setup costs
# more than a few tuples).
_SHORT_CATCH_UP = 4
# A request's lookups scan its tokens (`scan`) until they have cost about what building its
# index would, then build it (ski rental: never more than twice the better choice in
# hindsight). Measured on the dev CPU: a scan ~19 us whatever the length (384 to 4000 tokens),
# an index lookup ~10 us, a build ~0.9 us a token; so a build pays for itself after ~L / 10
# lookups of an L-token sequence. At least _SCAN_LOOKUPS scans: where drafts fail, dynamic
# speculation stops proposing for a request after a few fruitless lookups, which then never pay
# for an index.
_SCAN_LOOKUPS = 8
_SCAN_LOOKUPS_PER_TOKEN = 0.1


def scan(tokens: list[int], sizes: range, k: int, arr: np.ndarray | None = None) -> list[int]:
    """What `_NgramIndex.propose` returns, by a scan: for n in `sizes` (descending), the latest
    earlier start of the last n tokens, and the k tokens after it. Only positions holding the
    last token are candidates (few in a large vocabulary); each longer n filters them. `arr`:
    the tokens as an array already, if the caller keeps one."""
    arr = np.asarray(tokens) if arr is None else arr
    length = len(arr)
    candidates = np.flatnonzero(arr[: length - 1] == arr[length - 1]) if length else arr
    for n in sizes:
        if n > length - 1:
            continue
        ends = candidates[candidates >= n - 1]  # n-grams ending there start at end - n + 1
        for j in range(1, n):
            if not len(ends):
                break
            ends = ends[arr[ends - j] == arr[length - 1 - j]]
        if len(ends):
            start = int(ends[-1]) + 1  # the token after the latest match
            return tokens[start : start + k]
    return []


# Dynamic speculation per step: choose k from the batch size and the measured acceptance.
#
# With per-draft acceptance probability a (drafts i.i.d., Leviathan et al. 2023, eq. 1), a
# request gains E(k) = (1 - a^(k+1)) / (1 - a) tokens per step with k drafts (k = 0: one).
# A target forward over n tokens costs about T(n) = max(1, n / S) plain memory-bound steps (a
# roofline: below S tokens weight reads dominate, above it compute; S = saturation_tokens),
# and each of the k draft passes over m requests costs c T(m), c = the draft's share of a
# target step (its parameter count over the target's; 0 for n-gram lookup). With B requests
# decoding, m of them with k drafts each, relative to a plain step:
#
#     speed-up = (B + m (E(k) - 1)) / B  /  ((T(B + m k) + k c T(m)) / T(B))
#
# and the step uses the k in 0..k_max with the highest speed-up, or 0 unless it beats plain
# decoding by _MIN_GAIN. So k falls to 0 as the batch grows (verifying k extra tokens per
# request is no longer free), as acceptance falls (E(k) -> 1), or as fewer requests are worth
# proposing for (m: those whose `DraftGate` is open, times the share of proposals that find
# drafts, `HitMeter`). The denominator is multiplied by a measured factor
# (`StepCostMeter`): what speculative steps took against plain ones, over what this model
# predicted (host work, kernels off the roofline). The same formula with the drafts actually
# proposed (n-gram lookup finds some for some requests only) decides whether they are worth a
# verify step (`speed_up`).
_MIN_GAIN = 1.05


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a request gains in a step with k drafts: 1 + a + a^2 + ... + a^k."""
    return sum(acceptance**i for i in range(k + 1))


def relative_step_cost(
    batch_size: int, num_drafts: list[int], draft_cost: float, saturation_tokens: int
) -> float:
    """The rule's cost of a step in plain decode steps: `batch_size` requests decoding, those
    in `num_drafts` verifying that many drafts each (proposed in max(num_drafts) passes)."""
    passes = max(num_drafts, default=0)
    return _step_cost(
        batch_size, sum(num_drafts), passes, len(num_drafts), draft_cost, saturation_tokens
    )


def _step_cost(batch_size, total_drafts, passes, num_drafting, draft_cost, saturation) -> float:
    def cost(num_tokens: int) -> float:
        return max(1.0, num_tokens / saturation)

    draft = passes * draft_cost * cost(num_drafting) if draft_cost else 0.0
    return (cost(batch_size + total_drafts) + draft) / cost(batch_size)


def speed_up(
    batch_size: int,
    num_drafts: list[int],
    acceptance: float,
    draft_cost: float,
    saturation_tokens: int,
    overhead: float = 1.0,
) -> float:
    """The rule's speed-up over a plain step of a step in which the requests in `num_drafts`
    verify that many drafts each and the rest of `batch_size` decode plainly."""
    passes = max(num_drafts, default=0)
    gains = [expected_tokens(acceptance, d) - 1 for d in range(passes + 1)]
    tokens = batch_size + sum(gains[d] for d in num_drafts)
    cost = relative_step_cost(batch_size, num_drafts, draft_cost, saturation_tokens)
    return tokens / batch_size / (overhead * cost)


def choose_num_drafts(
    batch_size: int,
    acceptance: float,
    k_max: int,
    draft_cost: float,
    saturation_tokens: int,
    overhead: float = 1.0,
    num_speculating: float | None = None,
    min_gain: float = _MIN_GAIN,
) -> int:
    """The step's draft count by the rule above (0: no speculation this step). `overhead`
    multiplies the modeled cost of a speculative step (`StepCostMeter.factor`);
    `num_speculating` (m, default all of `batch_size`; a float: an expected count) requests
    would get the drafts; `min_gain`: the speed-up a k must beat.

    The measured inputs are rounded (acceptance and overhead to 0.01, m to a quarter request)
    so that the cached rule answers: they move with every step that looks up or verifies,
    and evaluating the rule took ~17 us, ~33 us a step in all on the dev CPU (on a host as
    fast, ~1.3% of a batch-64 decode step of the 0.9B shape on an H200)."""
    m = None if num_speculating is None else round(num_speculating * 4) / 4
    return _choose_num_drafts(
        batch_size,
        round(acceptance, 2),
        k_max,
        draft_cost,
        saturation_tokens,
        round(overhead, 2),
        m,
        min_gain,
    )


@functools.lru_cache(maxsize=4096)
def _choose_num_drafts(
    batch_size, acceptance, k_max, draft_cost, saturation_tokens, overhead, m, min_gain
) -> int:
    m = batch_size if m is None else m
    best_k, best = 0, min_gain
    for k in range(1, k_max + 1):
        tokens = batch_size + m * (expected_tokens(acceptance, k) - 1)
        cost = _step_cost(batch_size, m * k, k, m, draft_cost, saturation_tokens)
        gain = tokens / batch_size / (overhead * cost)
        if gain > best:
            best_k, best = k, gain
    return best_k


class StepCostMeter:
    """What a speculative step really costs against what the rule's model says, measured.

    The model prices a verify pass by its token count and each draft pass by the draft's
    parameters. What no token count shows: the proposer's host work, the target's and the
    draft's kernels off the roofline, eager launches where a step does not fit a decode CUDA
    graph. So each speculative step's duration, its proposal included, is divided by (the
    plain steps' average duration at the same batch size x the modeled relative cost), and the
    exponential average of that ratio, `factor`, multiplies the modeled cost of the next
    choices (1.0 until measured). The engine leaves out steps in which a draft model caught a
    request up on more than one step's tokens (a one-off cost: the prompt, or a pause).

    Plain steps are kept per batch-size bucket (powers of two): the engine runs plain steps in
    a bucket before speculating there (`needs_plain`). Without that reference a run that
    speculated from its first step never measured its cost: on an H100 a draft model's eager
    steps ran at 0.3x plain decoding while the factor stayed at 1.0 (2026-11-26). A slow
    reference makes every speculative step look cheap, and plain steps stop once speculation
    runs, so: the first plain step is not timed (the engine's first decodes pay one-off costs;
    on CPU the first took 25x the next), and after `refresh` priced speculative steps in a
    bucket the engine runs a plain one there again (contexts grow; one outlier must not last).
    """

    def __init__(self, decay: float = 0.8, refresh: int = 32):
        self.decay, self.refresh = decay, refresh
        self.plain_s: dict[int, float] = {}  # bucket -> average plain decode step, seconds
        self._since_plain: dict[int, int] = {}  # bucket -> speculative steps priced since
        self._warm = False  # the first, untimed, plain step ran
        # The factor is a decayed average of the measured ratios with the model's 1.0 as a
        # prior worth one observation: the first verify step moves it halfway (an average
        # that started at 1.0 with weight decay / (1 - decay) took ~8 steps to reach a
        # measured 2.7 in async decode on an H200, each of them a loss).
        self._ratio_sum, self._weight = 1.0, 1.0

    @property
    def factor(self) -> float:
        return self._ratio_sum / self._weight

    @staticmethod
    def bucket(batch_size: int) -> int:
        return 1 << max(batch_size - 1, 0).bit_length()

    def needs_plain(self, batch_size: int) -> bool:
        key = self.bucket(batch_size)
        return key not in self.plain_s or self._since_plain[key] >= self.refresh

    def observe_plain(self, batch_size: int, seconds: float) -> None:
        if not self._warm:
            self._warm = True
            return
        key = self.bucket(batch_size)
        old = self.plain_s.get(key, seconds)
        self.plain_s[key] = self.decay * old + (1 - self.decay) * seconds
        self._since_plain[key] = 0

    def observe_speculative(self, batch_size: int, modeled_cost: float, seconds: float) -> None:
        key = self.bucket(batch_size)
        plain = self.plain_s.get(key)
        if plain is None or modeled_cost <= 0:
            return  # nothing to compare with yet
        ratio = seconds / (plain * modeled_cost)
        self._ratio_sum = self.decay * self._ratio_sum + ratio
        self._weight = self.decay * self._weight + 1.0
        self._since_plain[key] += 1


class AcceptanceMeter:
    """The measured per-draft acceptance probability, an exponential average over steps.

    A request verifying k drafts accepts n: n draft positions were accepted and, if n < k, one
    was rejected (later ones were never reached). The estimate is accepted / (accepted +
    rejected), the geometric distribution's maximum likelihood, not accepted / drafted (which
    counts unreached drafts as failures and so depends on k)."""

    def __init__(self, decay: float = 0.9, prior: float = 0.7):
        self.decay = decay
        # Pseudo-counts: start at `prior` with the weight of a few drafts.
        self.accepted, self.tried = 2.0 * prior, 2.0
        self.num_outcomes = 0  # drafts accepted or rejected since the start, not decayed

    @property
    def acceptance(self) -> float:
        return self.accepted / self.tried

    def update(self, verified: list[tuple[int, int]]) -> None:
        """One step's (num_drafted, num_accepted) per request that verified drafts."""
        if not verified:
            return
        accepted = sum(n for _, n in verified)
        rejected = sum(1 for k, n in verified if n < k)
        self.accepted = self.decay * self.accepted + accepted
        self.tried = self.decay * self.tried + accepted + rejected
        self.num_outcomes += accepted + rejected


class HitMeter:
    """The share of proposals that came back with drafts (n-gram lookup finds some for some
    requests only; a draft model always drafts), an exponential average over steps: the step
    rule expects drafts for that share of the requests it may propose for."""

    def __init__(self, decay: float = 0.9, prior: float = 1.0):
        self.decay = decay
        self.hits, self.tries = 2.0 * prior, 2.0  # pseudo-counts, as AcceptanceMeter's

    @property
    def rate(self) -> float:
        return self.hits / self.tries

    def update(self, num_hits: int, num_tries: int) -> None:
        self.hits = self.decay * self.hits + num_hits
        self.tries = self.decay * self.tries + num_tries


# Dynamic speculation per request (`DraftGate`). How many drafts: draft j is proposed while
# acceptance**j >= _MIN_REACH (the chance it is reached and accepted), at least one, where
# acceptance is an exponential average (_EMA) of the share of the request's drafts accepted.
# Whether at all: a request whose proposals gain nothing _PATIENCE times in a row (the n-gram
# lookup found no draft, or the target accepted none) pauses for _PAUSE tokens, twice as long
# after each further fruitless proposal, up to _MAX_PAUSE; an accepted draft ends its pauses.
# So a request whose text the proposer cannot predict costs a lookup every hundred tokens or
# so, and stops putting the whole batch on the verify path (on an H100 a step verifying a few drafts
# cost ~1.2 ms more than a plain ~3 ms one at batch 64: RESULTS.md, issue 8).
_EMA = 0.8
_MIN_REACH = 0.2
_PATIENCE = 4
_PAUSE = 8
_MAX_PAUSE = 128


@dataclass
class DraftGate:
    """One request's dynamic speculation state (`Request.spec_gate`): the engine asks it how
    many drafts to propose (`num_drafts`) and tells it what came of each proposal
    (`observe`)."""

    acceptance: float = 1.0  # recent share of its drafts accepted
    fruitless: int = 0  # proposals in a row that gained nothing
    # Not proposed for before the request has this many tokens (math.inf: never, e.g. a
    # request with penalties or logprobs, whose verification the runner does not do).
    resume_at: float = 0
    started: bool = False  # proposed for at least once

    def is_open(self, num_tokens: int) -> bool:
        return num_tokens >= self.resume_at

    def num_drafts(self, k: int) -> int:
        """Drafts to propose now, at most k (the step's), at least one."""
        n, reach = 1, self.acceptance * self.acceptance
        while n < k and reach >= _MIN_REACH:
            n, reach = n + 1, reach * self.acceptance
        return n

    def observe(self, num_drafted: int, num_accepted: int, num_tokens: int) -> None:
        """A proposal's outcome: `num_drafted` drafts verified (0: the proposer found none),
        `num_accepted` of them accepted; `num_tokens`, the request's length then."""
        self.started = True
        if num_drafted:
            self.acceptance = _EMA * self.acceptance + (1 - _EMA) * num_accepted / num_drafted
        if num_accepted:
            self.fruitless = 0
            return
        self.fruitless += 1
        if self.fruitless >= _PATIENCE:
            pause = min(_PAUSE << (self.fruitless - _PATIENCE), _MAX_PAUSE)
            self.resume_at = num_tokens + pause


def accept_greedy(draft: list[int], target_argmax: list[int]) -> list[int]:
    """Greedy verification: accept drafts while each equals the target's argmax at its position,
    then append the target's own token there (`target_argmax` has len(draft) + 1 entries)."""
    n = 0
    while n < len(draft) and draft[n] == target_argmax[n]:
        n += 1
    return draft[:n] + [target_argmax[n]]


def rejection_sample(
    target_probs: torch.Tensor,
    draft: list[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2).

    target_probs [k+1, V]: p_j, the target's (temperature, top-k/p, min-p processed) distribution
    at each position; draft_probs [k, V]: q_j, the proposer's, or None when the proposal is a
    point mass on the draft token (n-gram), where q(x) = 1 and the rule accepts x with p(x).

        accept d_j with probability min(1, p_j(d_j) / q_j(d_j)), in order, stopping at the first
        rejection j; then draw one token from norm(max(0, p_j - q_j)), or from p_k if all k
        were accepted.

    The output is distributed exactly as sampling from p token by token."""
    k = len(draft)
    rows = torch.arange(k, device=target_probs.device)
    drafted = torch.tensor(draft, device=target_probs.device)
    p = target_probs[rows, drafted]
    q = draft_probs[rows, drafted] if draft_probs is not None else torch.ones_like(p)
    u = torch.rand(k, generator=generator, device=target_probs.device)
    accepted = u < p / q  # u in [0, 1), so this is probability min(1, p/q)
    n = int(accepted.cumprod(0).sum())
    if n == k:
        final = target_probs[k]
    else:
        if draft_probs is not None:
            residual = (target_probs[n] - draft_probs[n]).clamp(min=0)
        else:
            residual = target_probs[n].clone()
            residual[draft[n]] = 0.0
        # NOTE: a rejection implies p_n != q_n, so the residual has mass; guard rounding anyway.
        final = residual if residual.sum() > 0 else target_probs[n]
    token = int(torch.multinomial(final / final.sum(), 1, generator=generator))
    return draft[:n] + [token]
