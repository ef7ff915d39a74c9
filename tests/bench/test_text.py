"""The language-modelling task: the character-level text loader, the GPT, the text problem, and
``mbf-bench run`` on ``text-gpt-tiny`` (on a small text written here, so CI needs no data)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import mbf
from mbf_bench import cli
from mbf_bench.data import DataError, load_text
from mbf_bench.data.text import TEXT_FILE, encode
from mbf_bench.models import GPT, GPTConfig
from mbf_bench.models.gpt import Block
from mbf_bench.problems import TextProblem
from mbf_bench.tasks import TASKS, get_task, make_problem
from mbf_bench.train import RunSpec, run
from tensors import state_tensors

SHARED_TEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "text" / TEXT_FILE
CPU = torch.device("cpu")
WORDS = ("the", "a", "prince", "count", "war", "peace", "said", "and", "of", "to", "in", "was",
         "he", "she", "her", "his", "natasha", "pierre")


def write_text(folder: Path, characters: int = 20_000, seed: int = 0) -> Path:
    """A War-and-Peace-shaped file (UTF-8 with a BOM, CRLF line ends) of random sentences made
    of a few words: enough structure for a tiny model to learn in a few dozen steps."""
    rng = random.Random(seed)
    lines = []
    while sum(len(line) + 2 for line in lines) < characters:
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize()
                     + ".")
    path = folder / "text" / TEXT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8"))
    return path


# --- the loader --------------------------------------------------------------------------------
def test_loader_normalizes_and_splits_in_order(tmp_path: Path) -> None:
    path = write_text(tmp_path)
    text = load_text(tmp_path)  # a parent folder: text/warpeace_input.txt is found in it
    raw = path.read_bytes().decode("utf-8-sig").replace("\r\n", "\n")
    assert "\r" not in text.vocabulary and "\ufeff" not in text.vocabulary
    assert text.vocabulary == "".join(sorted(set(raw)))
    whole = torch.cat([text.train, text.val, text.test])
    assert "".join(text.vocabulary[i] for i in whole.tolist()) == raw
    n = len(raw)
    assert text.val.numel() == round(0.05 * n) == text.test.numel()
    assert text.train.numel() == n - 2 * round(0.05 * n)
    assert load_text(path).vocabulary == text.vocabulary  # the file itself works too


def test_encode_refuses_a_character_outside_the_vocabulary() -> None:
    assert encode("abca", "abc").tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="'z' at 2"):
        encode("abz", "abc")


def test_missing_and_corrupt_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        load_text(tmp_path / "nowhere")
    with pytest.raises(DataError, match=TEXT_FILE):
        load_text(tmp_path)  # a folder without the file
    path = write_text(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:5000] + b"\xff\xfe" + data[5000:])
    with pytest.raises(DataError, match=rf"{TEXT_FILE}: not UTF-8 text \(byte 5000"):
        load_text(tmp_path)
    path.write_bytes(data[:5000] + b"\x00" * 8 + data[5000:])
    with pytest.raises(DataError, match=f"{TEXT_FILE}: holds NUL"):
        load_text(tmp_path)
    path.write_bytes(data[:300])
    with pytest.raises(DataError, match=f"{TEXT_FILE}: .* too few"):
        load_text(tmp_path)


def test_the_real_text_loads_as_documented() -> None:
    if not SHARED_TEXT.is_file():
        pytest.skip(f"the real text {SHARED_TEXT} is not here")
    text = load_text(SHARED_TEXT)
    assert text.vocab_size == TASKS["text-gpt"].shape.vocab_size == 148  # type: ignore[union-attr]
    assert text.train.numel() + text.val.numel() + text.test.numel() == 3_203_272
    start = "".join(text.vocabulary[i] for i in text.train[:25].tolist())
    assert start == '"Well, Prince, so Genoa a'


# --- the model -----------------------------------------------------------------------------------
def test_gpt_shapes_and_parameter_count() -> None:
    config = GPTConfig(vocab_size=11, context=8, layers=2, width=16, heads=4)
    model = GPT(config, seed=0)
    assert model(torch.randint(0, 11, (3, 8))).shape == (3, 8, 11)
    assert model(torch.randint(0, 11, (3, 5))).shape == (3, 5, 11)  # shorter than the context
    w, v, t = 16, 11, 8
    block = 2 * 2 * w + 4 * (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w)
    assert sum(p.numel() for p in model.parameters()) == v * w + t * w + 2 * block + 2 * w + w * v
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(vocab_size=11, context=8, width=10, heads=4)


def test_gpt_init_is_a_function_of_the_seed() -> None:
    config = GPTConfig(vocab_size=7, context=4, width=8, heads=2)
    a, b, c = GPT(config, seed=3), GPT(config, seed=3), GPT(config, seed=4)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert not torch.equal(a.tok.weight, c.tok.weight)
    block = a.blocks[0]
    assert isinstance(block, Block)  # residual projections start smaller (GPT-2's init)
    assert float(block.proj.weight.detach().std()) < float(block.fc.weight.detach().std())


def test_gpt_is_causal() -> None:
    """Changing token s changes no output at positions before s, and does change the others."""
    model = GPT(GPTConfig(vocab_size=13, context=10, layers=2, width=16, heads=2), seed=1)
    model = model.double()
    tokens = torch.randint(0, 13, (2, 10))
    base = model(tokens)
    for s in range(10):
        changed = tokens.clone()
        changed[:, s] = (changed[:, s] + 1) % 13
        out = model(changed)
        torch.testing.assert_close(out[:, :s], base[:, :s], rtol=0, atol=1e-12)
        assert (out[:, s:] - base[:, s:]).abs().amax(dim=-1).min() > 1e-6


# --- the problem ---------------------------------------------------------------------------------
def _problem(tmp_path: Path, seed: int = 0, tuning: bool = False) -> TextProblem:
    write_text(tmp_path)
    task = get_task("text-gpt-tiny")
    problem = make_problem(task, load_text(tmp_path), seed=seed, device=CPU,
                           holdout=0.1 if tuning else None)
    assert isinstance(problem, TextProblem)
    return problem


def test_batches_are_next_token_windows_fixed_by_seed_epoch_and_index(tmp_path: Path) -> None:
    problem = _problem(tmp_path)
    x, y = problem.batch(2, 5)
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # the target is the input shifted by one
    train = problem.train.tolist()
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        start = next(i for i in range(len(train)) if train[i : i + 17] == row_x + row_y[-1:])
        assert start + 17 <= len(train)
    again = _problem(tmp_path).batch(2, 5)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert not torch.equal(problem.batch(2, 6)[0], x)
    assert not torch.equal(_problem(tmp_path, seed=1).batch(2, 5)[0], x)


def test_evaluation_reads_fixed_windows_and_the_test_tail_only_at_the_end(tmp_path: Path) -> None:
    problem = _problem(tmp_path)
    assert problem.val_windows.shape == (512 // 16, 17)
    covered = torch.cat([problem.val_windows[:1, :1], problem.val_windows[:, 1:].reshape(1, -1)],
                        dim=1)
    torch.testing.assert_close(covered[0], get_val(tmp_path)[: 512 + 1], rtol=0, atol=0)
    model = GPT(GPTConfig(vocab_size=len(load_text(tmp_path).vocabulary), context=16, layers=1,
                          width=32, heads=2), seed=0)
    during = problem.evaluate(model)
    final = problem.evaluate(model, final=True)
    assert set(during) == {"val_loss"} and set(final) == {"val_loss", "test_loss"}
    assert during["val_loss"] == final["val_loss"]
    assert set(_problem(tmp_path, tuning=True).evaluate(model, final=True)) == {"val_loss"}


def get_val(folder: Path) -> torch.Tensor:
    return load_text(folder).val


# --- runs ----------------------------------------------------------------------------------------
def _lines(directory: Path) -> list[dict]:
    return [json.loads(t) for t in (directory / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["adam", "mbf"])
def test_tiny_gpt_learns_through_the_cli(optimizer: str, tmp_path: Path) -> None:
    write_text(tmp_path / "data")
    code = cli.main(["run", "--task", "text-gpt-tiny", "--optimizers", optimizer,
                     "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                     "--no-progress", "--set", "lr=0.01"])
    assert code == 0
    directory = tmp_path / "out" / "text-gpt-tiny" / optimizer / "0"
    evals = [line for line in _lines(directory) if "val_loss" in line]
    assert [line["step"] for line in evals] == [10, 20, 30]
    assert ["test_loss" in line for line in evals] == [False, False, True]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 0.3
    config = json.loads((directory / "config.json").read_text())
    assert config["status"] == "finished" and config["test_metric"] == "val_loss"


@pytest.mark.parametrize("optimizer", ["adam", "mbf"])
def test_tiny_gpt_resumes_bitwise(optimizer: str, tmp_path: Path) -> None:
    write_text(tmp_path / "data")
    spec = RunSpec(task="text-gpt-tiny", optimizer=optimizer, max_steps=25,
                   data_dir=str(tmp_path / "data"), checkpoint_every_steps=7)
    whole = run(spec, tmp_path / "whole", progress=False)

    def crash(step: int) -> None:
        if step == 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(spec, tmp_path / "cut", progress=False, on_step=crash)
    resumed = run(spec, tmp_path / "cut", resume=True, progress=False)
    assert resumed.status == whole.status == "finished"

    def strip(path: Path) -> list[dict]:
        return [{k: v for k, v in line.items() if "seconds" not in k} for line in _lines(path)]

    assert strip(resumed.directory) == strip(whole.directory)
    a = torch.load(whole.directory / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed.directory / "checkpoint.pt", weights_only=True)
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    state_a, state_b = state_tensors(a["optimizer"]), state_tensors(b["optimizer"])
    assert len(state_a) == len(state_b) > 0
    for (name, x), (_, y) in zip(state_a, state_b, strict=True):
        assert torch.equal(x, y), name


# --- MBF's blocks on the GPT (docs/layers.md, "A transformer") -----------------------------------
def test_mbf_cuts_every_gpt_parameter_by_its_modules_rule() -> None:
    """Each parameter in exactly one unit: token and position tables one block per row (a
    token's or a position's vector, chunked), LayerNorm (gamma_c, beta_c) pairs, every Linear
    (attention projections, MLP, head) one block per output unit with its bias appended."""
    config = GPTConfig(vocab_size=40, context=12, layers=2, width=64, heads=4)
    model = GPT(config, seed=0)
    units = {u.name.split(" ")[0]: u.layout for u in mbf.MBF(model, max_block_size=32).blocks()}
    covered = [id(p) for u in mbf.MBF(model).blocks() for p in u.params]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())
    assert len(set(covered)) == len(covered)
    for name, rows in (("tok", 40), ("pos", 12)):
        layout = units[name]
        assert (layout.kind, layout.rows, layout.row_length) == ("embedding", rows, 64)
        assert (layout.chunks, layout.block_size) == (2, 32)
    for name in ("blocks.0.ln1", "blocks.1.ln2", "ln_f"):
        assert (units[name].kind, units[name].rows, units[name].block_size) == ("norm", 64, 2)
    expected = {"attn.query": (64, 65), "attn.key": (64, 65), "attn.value": (64, 65),
                "attn.out": (64, 65), "fc": (256, 65), "proj": (64, 257)}
    for layer in ("blocks.0", "blocks.1"):
        for name, (rows, length) in expected.items():
            layout = units[f"{layer}.{name}"]
            assert (layout.kind, layout.rows, layout.row_length) == ("linear", rows, length)
            assert len(layout.shapes) == 2  # the bias is in the unit
    head = units["head"]
    assert (head.kind, head.rows, head.row_length, len(head.shapes)) == ("linear", 40, 64, 1)


def test_token_blocks_hold_each_tokens_own_gradient_outer_product() -> None:
    """Float64: after one statistics update the block of token t is (1 - stat_decay) g_t g_t^T
    (chunked), g_t the gradient of t's row; tokens absent from the batch have zero blocks."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=9, context=6, layers=1, width=8, heads=2), seed=0).double()
    optimizer = mbf.MBF(model, max_block_size=5, stat_decay=0.9)  # rows of 8: 2 chunks of 4
    tokens = torch.randint(0, 6, (3, 6))  # ids 6, 7, 8 never appear
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    grad = model.tok.weight.grad.clone()
    optimizer.step()
    (tok,) = [u for u in optimizer.blocks() if u.name.startswith("tok ")]
    pieces = grad.reshape(9, 2, 4)  # (token, chunk, entries)
    reference = 0.1 * pieces[..., :, None] * pieces[..., None, :]
    torch.testing.assert_close(tok.fisher.reshape(9, 2, 4, 4), reference, rtol=1e-12, atol=0)
    assert float(tok.fisher.reshape(9, -1)[6:].abs().max()) == 0.0
    assert float(tok.fisher.reshape(9, -1)[:6].abs().amax(dim=1).min()) > 0.0
