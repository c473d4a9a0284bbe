"""kvtransfer.scatter's guarded scatter: rows land where the index says while the transfer's
token is live, and nowhere once it is disabled; a later transfer sharing the slot is live again.

Under Triton's interpreter on CPU in the default suite, compiled on a GPU with `pytest -m gpu`
(where `disable` goes through its own stream)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel is defined
pytest.importorskip("triton", minversion=None if torch.cuda.is_available() else "3.9")

from kvtransfer.scatter import SLOTS, Guard  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def new_guard(device: str) -> Guard:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    return Guard(torch.device(device))


def setup(device: str, num_words: int):
    g = torch.Generator().manual_seed(0)
    dst = torch.randint(-(1 << 40), 1 << 40, (12, num_words), generator=g).to(device)
    src = torch.randint(-(1 << 40), 1 << 40, (3, num_words), generator=g).to(device)
    rows = torch.tensor([7, 0, 11], device=device)
    return dst, src, rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_words", [5, 1024, 2500])  # under, at and over a program's block
def test_a_live_token_copies_its_rows_and_nothing_else(device, num_words):
    guard = new_guard(device)
    dst, src, rows = setup(device, num_words)
    want = dst.clone()
    want[rows] = src
    guard.launch(dst, rows, src, guard.next_token())
    assert torch.equal(dst.cpu(), want.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_a_disabled_token_writes_nothing_and_its_slot_serves_the_next_round(device):
    guard = new_guard(device)
    dst, src, rows = setup(device, 300)
    before = dst.clone()
    token = guard.next_token()
    other = guard.next_token()
    guard.disable(token)
    guard.launch(dst, rows, src, token)
    assert torch.equal(dst.cpu(), before.cpu())
    # a disable leaves every other transfer live: the next token, and the one SLOTS later
    # that reuses the disabled token's slot
    guard.launch(dst, rows[:1], src[:1], other)
    for _ in range(SLOTS - 2):  # past `other`
        guard.next_token()
    reuse = guard.next_token()
    assert reuse % SLOTS == token % SLOTS
    guard.launch(dst, rows[1:], src[1:], reuse)
    want = before.clone()
    want[rows] = src
    assert torch.equal(dst.cpu(), want.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_warm_up_writes_nothing(device):
    guard = new_guard(device)
    dst, _, _ = setup(device, 64)
    before = dst.clone()
    guard.warm_up(dst)
    assert torch.equal(dst.cpu(), before.cpu())


class FakeEvent:
    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done


def test_a_disabled_slot_is_held_until_its_last_scatter_ran():
    """A later token of a disabled slot would overwrite the guard word and revive the queued
    scatters it stopped: no token takes the slot until they have run."""
    guard = Guard(torch.device("cpu"))
    token = guard.next_token()
    last_scatter = FakeEvent()
    guard.disable(token, last_scatter)
    tokens = [guard.next_token() for _ in range(2 * SLOTS)]
    assert all(t % SLOTS != token % SLOTS for t in tokens)  # skipped while held
    assert len(set(tokens)) == len(tokens) and 0 not in tokens
    last_scatter.done = True
    tokens = [guard.next_token() for _ in range(SLOTS)]
    assert any(t % SLOTS == token % SLOTS for t in tokens)  # free again
