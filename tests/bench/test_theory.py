"""The theory and curvature commands: every exact quantity against dense float64 autodiff."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from mbf import MBF
from mbf.curvature import unfold_input
from mbf_bench import curvature_picture as cp
from mbf_bench import theory as th
from reference import block_diagonal, dense_blocks

D64 = torch.float64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- theory: the two-layer network ---------------------------------------------------------------
def _tiny(
    n: int = 4, d: int = 5, m: int = 7, seed: int = 0
) -> tuple[th.TwoLayerReLU, th.RegressionProblem]:
    problem = th.load_problem("random", n, dim=d, seed=seed)
    return th.TwoLayerReLU(d, m, seed), problem


def _dense_jacobian(model: th.TwoLayerReLU, x: Tensor) -> Tensor:
    """``(n, m * d)`` Jacobian of all outputs with respect to ``W``, by ``torch.func.jacrev``."""
    buffers = dict(model.named_buffers())

    def outputs(w: Tensor) -> Tensor:
        return functional_call(model, ({"hidden.weight": w}, buffers), (x,))

    jac = jacrev(outputs)(model.hidden.weight.detach())
    return jac.reshape(x.shape[0], -1)


def test_snapshot_matches_autodiff() -> None:
    model, problem = _tiny()
    snap = th.snapshot(model, problem)
    n = problem.x.shape[0]
    torch.testing.assert_close(snap.jac.reshape(n, -1), _dense_jacobian(model, problem.x))
    delta = vmap(grad(model.head))(model.hidden(problem.x).detach())
    torch.testing.assert_close(snap.delta, delta)
    torch.testing.assert_close(snap.residual, model(problem.x).detach() - problem.y)
    with torch.no_grad():
        loss = 0.5 * float((model(problem.x) - problem.y).square().mean())
    assert snap.loss == pytest.approx(loss)


@pytest.mark.parametrize("max_block_size", [5, 2])  # whole rows; rows of 5 cut into 3 + 2 (padded)
def test_gauss_newton_blocks_match_dense_jtj(max_block_size: int) -> None:
    model, problem = _tiny()
    jac = _dense_jacobian(model, problem.x)
    dense = jac.T @ jac / problem.x.shape[0]
    layout = th.library_layout(model, max_block_size)
    got = th.gauss_newton_blocks(th.snapshot(model, problem), layout)
    want = dense_blocks(layout, dense)
    assert len(want) == got.shape[0] == 7 * layout.chunks
    for block, ref in zip(got, want, strict=True):
        k = ref.shape[0]
        torch.testing.assert_close(block[:k, :k], ref)
        assert torch.count_nonzero(block[k:]) == 0


@pytest.mark.parametrize("max_block_size", [5, 2])
def test_mbf_direction_is_dense_block_diagonal_pseudo_inverse(max_block_size: int) -> None:
    model, problem = _tiny()
    snap = th.snapshot(model, problem)
    jac = _dense_jacobian(model, problem.x)
    n = problem.x.shape[0]
    g = jac.T @ snap.residual / n
    layout = th.library_layout(model, max_block_size)
    want = torch.zeros_like(g)
    for idx in layout.dense_indices():
        block = jac[:, idx].T @ jac[:, idx] / n
        want[idx] = torch.linalg.pinv(block, hermitian=True, rtol=1e-10) @ g[idx]
    got = th._block_method(layout, 1e-13)(snap, snap.residual[:, None])[0].reshape(-1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_gauss_newton_and_gd_directions() -> None:
    model, problem = _tiny()
    snap = th.snapshot(model, problem)
    jac = _dense_jacobian(model, problem.x)
    n = problem.x.shape[0]
    g = jac.T @ snap.residual / n
    res = snap.residual[:, None]
    gn = th._gauss_newton(1e-13)(snap, res)[0].reshape(-1)
    want = torch.linalg.pinv(jac.T @ jac / n, hermitian=True, rtol=1e-10) @ g
    torch.testing.assert_close(gn, want, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(th._gradient_descent(snap, res)[0].reshape(-1), g)


def test_kfac_direction_is_the_kronecker_pseudo_inverse_of_its_definition() -> None:
    model, problem = _tiny()
    snap = th.snapshot(model, problem)
    x, n = problem.x, problem.x.shape[0]
    delta = torch.stack([grad(model.head)(model.hidden(xi).detach()) for xi in x])  # one by one
    a_fac = sum(torch.outer(xi, xi) for xi in x) / n  # KFAC's factors, by definition
    g_fac = sum(torch.outer(di, di) for di in delta) / n
    # The exact Gauss-Newton matrix is the mean of the Kronecker products KFAC approximates.
    jac = _dense_jacobian(model, x)
    kron_mean = sum(
        torch.kron(torch.outer(di, di), torch.outer(xi, xi))
        for di, xi in zip(delta, x, strict=True)
    )
    torch.testing.assert_close(jac.T @ jac / n, kron_mean / n)
    g = jac.T @ snap.residual / n
    want = torch.linalg.pinv(torch.kron(g_fac, a_fac), hermitian=True, rtol=1e-10) @ g
    got = th._kfac(1e-13)(snap, snap.residual[:, None])[0].reshape(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_linearized_operators_match_the_predictions() -> None:
    """With n <= d and full-row-rank X: MBF's M = diag(c), Gauss-Newton's M = I, KFAC's = n I."""
    model, problem = _tiny(n=4, d=6, m=9)
    snap = th.snapshot(model, problem)
    methods = th.methods_for(model, 1e-13)
    c = (snap.pre > 0).sum(1).to(D64)
    assert c.min() > 0
    eye = torch.eye(4, dtype=D64)
    torch.testing.assert_close(
        th.linear_operator(methods["idealized_mbf"], snap), torch.diag(c), rtol=0, atol=1e-7
    )
    torch.testing.assert_close(
        th.linear_operator(methods["gauss_newton"], snap), eye, rtol=0, atol=1e-7
    )
    torch.testing.assert_close(
        th.linear_operator(methods["kfac"], snap), 4 * eye, rtol=0, atol=1e-6
    )
    jac = snap.jac.reshape(4, -1)
    torch.testing.assert_close(
        th.linear_operator(methods["gradient_descent"], snap), jac @ jac.T / 4
    )


def test_library_layout_is_the_optimizers() -> None:
    model, _ = _tiny(d=5)
    opt = MBF(model, lr=0.1, max_block_size=2)
    (unit,) = opt.blocks()
    mine = th.library_layout(model, 2)
    assert [i.tolist() for i in mine.dense_indices()] == [
        i.tolist() for i in unit.layout.dense_indices()
    ]


def test_fit_rate_recovers_a_geometric_rate_and_stops_at_the_floor() -> None:
    losses = [3.0 * 0.3**k for k in range(60)]
    fit = th.fit_rate(losses)
    assert fit["factor"] == pytest.approx(0.3, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["iterations"] == int(np.ceil(np.log(th.FIT_FLOOR) / np.log(0.3)))
    curved = [1.0 / (k + 1) for k in range(20)]
    assert th.fit_rate(curved)["r2"] < 0.99


def test_load_problem_requires_full_row_rank() -> None:
    with pytest.raises(ValueError, match="full row rank"):
        th.load_problem("random", 9, dim=8)
    with pytest.raises(ValueError, match="unknown data set"):
        th.load_problem("cifar", 4)
    problem = th.load_problem("digits", 12, seed=3)
    assert problem.x.shape == (12, 64)
    torch.testing.assert_close(problem.x.norm(dim=1), torch.ones(12, dtype=D64))
    assert set(problem.y.tolist()) <= {-1.0, 1.0}


def test_mnist_problem_from_shared_data(shared_data: Path) -> None:
    problem = th.load_problem("mnist", 10, data_dir=shared_data)
    assert problem.x.shape == (10, 784)


def test_mnist_missing_folder_names_the_remedy(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        th.main(["--data", "mnist", "--data-dir", str(tmp_path), "--widths", "8"])
    assert exc.value.code == 2
    assert "--data-dir" in capsys.readouterr().err


def test_theory_main_writes_json_with_documented_keys_and_png(tmp_path: Path) -> None:
    out, png, check = tmp_path / "t.json", tmp_path / "t.png", tmp_path / "c.png"
    argv = ["--data", "random", "digits", "--widths", "8,16", "--iters", "6", "--n", "6"]
    argv += ["--dim", "40", "--json", str(out), "--plot", str(png), "--check-plot", str(check)]
    threads = torch.get_num_threads()
    assert th.main(argv + ["--threads", "2"]) == 0
    assert torch.get_num_threads() == threads  # the process's setting is restored
    report = json.loads(out.read_text())
    assert report["headline"] == {"data": "random", "width": 16}
    for name in ("gradient_descent", "gauss_newton", "kfac", "idealized_mbf", "mbf_chunked"):
        assert name in report["labels"]
        losses = report[name]["loss"]
        assert 2 <= len(losses) <= 7 and all(isinstance(v, float) for v in losses)
        assert len(report[name]["runs"]) == 4
        run = report[name]["runs"][0]
        assert {"eta", "fit", "predicted_fit", "predicted_loss", "asymptotic_factor"} <= set(run)
        assert {"slope", "factor", "r2", "iterations"} == set(run["fit"])
    mbf_run = report["idealized_mbf"]["runs"][0]
    assert mbf_run["prediction_check"]["operator_vs_diag_c"] < 1e-6
    assert mbf_run["diverged"] is False
    assert report["idealized_mbf"]["loss"][-1] < report["idealized_mbf"]["loss"][0]
    assert len(report["block_mass"]) == 4
    for path in (png, check):
        assert path.read_bytes()[:8] == PNG_MAGIC


# --- curvature picture ---------------------------------------------------------------------------
def _tiny_models() -> list[tuple[nn.Module, str, Tensor, Tensor]]:
    torch.manual_seed(1)
    mlp, mlp_layer = cp.make_model("mlp", 4, seed=1)
    cnn, cnn_layer = cp.make_model("cnn", 4, seed=1)
    x = torch.randn(6, 1, 4, 4, dtype=D64)
    y = torch.randint(0, 10, (6,))
    return [(mlp.to(D64), mlp_layer, x, y), (cnn.to(D64), cnn_layer, x, y)]


def _loop_grads(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``(N, p)`` per-example gradients by plain autograd, one example at a time."""
    rows = []
    for xi, yi in zip(x, y, strict=True):
        loss = F.cross_entropy(model(xi[None]), yi[None])
        rows.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, model.parameters())])
        )
    return torch.stack(rows)


@pytest.mark.parametrize("which", [0, 1])
def test_empirical_fisher_matches_per_example_autograd(which: int) -> None:
    model, _, x, y = _tiny_models()[which]
    stats = cp.unit_stats(model, x, y)
    got = torch.cat([s.grads for s in stats], dim=1)
    names = [k for k, _ in model.named_parameters()]
    per = cp.per_example_grads(model, x, y)
    # Units follow the library's order; compare parameter by parameter through the unit params.
    ids = {id(p): k for k, p in model.named_parameters()}
    loop = _loop_grads(model, x, y)
    offsets = np.cumsum([0] + [p.numel() for p in model.parameters()])
    by_name = {k: loop[:, offsets[i] : offsets[i + 1]] for i, k in enumerate(names)}
    want = torch.cat([by_name[ids[id(p)]] for s in stats for p in s.unit.params], dim=1)
    torch.testing.assert_close(got, want)
    for k in names:
        torch.testing.assert_close(per[k].reshape(len(x), -1), by_name[k])
    # The mini-blocks are the dense empirical Fisher's diagonal blocks.
    for s in stats:
        dense = s.grads.T @ s.grads / len(x)
        blocks = cp._mbf_blocks(s)
        for block, ref in zip(blocks, dense_blocks(s.unit.layout, dense), strict=True):
            torch.testing.assert_close(block[: len(ref), : len(ref)], ref)


def test_mbf_blocks_equal_the_optimizers_per_example_statistics() -> None:
    model, _, x, y = _tiny_models()[0]
    opt = MBF(model, lr=0.0, estimator="per_example", bias_correction=False,
              tie_rows=False)  # the analysis is of the paper's blocks, one per row
    F.cross_entropy(model(x), y).backward()
    opt.step()
    stats = cp.unit_stats(model, x, y)
    for unit, s in zip(opt.blocks(), stats, strict=True):
        assert unit.layout.dense_indices()[0].tolist() == s.unit.layout.dense_indices()[0].tolist()
        torch.testing.assert_close(unit.fisher, cp._mbf_blocks(s))


def test_kfac_factors_match_definitions() -> None:
    model, layer, x, y = _tiny_models()[0]  # the MLP: check the output layer analytically
    io = cp.capture_layer_io(model, x, y)
    out_layer = model[-1]
    a, d = io[out_layer]
    gamma, omega = cp.kfac_factors(out_layer, a, d)
    with torch.no_grad():
        hidden = model[:-1](x)
        probs = torch.softmax(out_layer(hidden), dim=1)
    delta = probs - F.one_hot(y, 10).to(D64)  # d(cross-entropy)/d(logits), per example
    abar = torch.cat([hidden, torch.ones(len(x), 1, dtype=D64)], dim=1)
    torch.testing.assert_close(gamma, delta.T @ delta / len(x))
    torch.testing.assert_close(omega, abar.T @ abar / len(x))

    cnn, layer, x, y = _tiny_models()[1]
    conv = cnn.get_submodule(layer)
    a, d = cp.capture_layer_io(cnn, x, y)[conv]
    gamma, omega = cp.kfac_factors(conv, a, d)
    u = unfold_input(conv, a)  # the library's im2col, independent of F.unfold
    positions = u.shape[-1]
    torch.testing.assert_close(omega, torch.einsum("nkt,nlt->kl", u, u) / len(x))
    dd = d.flatten(2)
    torch.testing.assert_close(gamma, torch.einsum("nct,ndt->cd", dd, dd) / (len(x) * positions))
    # Patches and output gradients reproduce each example's weight gradient.
    per = cp.per_example_grads(cnn, x, y)[f"{layer}.weight"]
    torch.testing.assert_close(torch.einsum("nct,nkt->nck", dd, u), per.reshape(len(x), 8, -1))


@pytest.mark.parametrize("which", [0, 1])
def test_directions_match_dense_solves(which: int) -> None:
    model, layer, x, y = _tiny_models()[which]
    stats = cp.unit_stats(model, x, y)
    picked = next(s for s in stats if s.unit.module is model.get_submodule(layer))
    n, p = picked.grads.shape
    dense = picked.grads.T @ picked.grads / n
    g = torch.randn(p, dtype=D64)
    lam = 0.05 * float(dense.diagonal().mean())
    got = cp.approximate_directions(picked, g, lam)
    eye = torch.eye(p, dtype=D64)
    torch.testing.assert_close(got["diagonal"], g / (dense.diagonal() + lam))
    torch.testing.assert_close(got["layer"], torch.linalg.solve(dense + lam * eye, g))
    mbf_dense = block_diagonal(picked.unit.layout, cp._mbf_blocks(picked), lam)
    torch.testing.assert_close(got["mbf"], torch.linalg.solve(mbf_dense, g))
    kron = torch.kron(picked.gamma, picked.omega)
    order = picked.kron_index.reshape(-1)
    kfac_dense = torch.zeros(p, p, dtype=D64)
    kfac_dense[order[:, None], order[None, :]] = kron
    torch.testing.assert_close(got["kfac"], torch.linalg.solve(kfac_dense + lam * eye, g))
    # Frobenius bookkeeping against the dense matrices.
    parts = cp._frobenius(picked)
    errors = cp._errors(parts, parts["total"])
    total = dense.square().sum()
    mask = torch.zeros(p, p, dtype=torch.bool)
    for idx in picked.unit.layout.dense_indices():
        mask[idx[:, None], idx[None, :]] = True
    assert errors["mbf"]["mass_kept"] == pytest.approx(float(dense[mask].square().sum() / total))
    assert errors["diagonal"]["mass_kept"] == pytest.approx(
        float(dense.diagonal().square().sum() / total)
    )
    assert errors["kfac"]["rel_error"] == pytest.approx(
        float((dense - kfac_dense).norm() / dense.norm())
    )


def test_curvature_main_writes_png_json_and_table(tmp_path: Path) -> None:
    png, out, md = tmp_path / "c.png", tmp_path / "c.json", tmp_path / "c.md"
    argv = ["--examples", "24", "--train-steps", "3", "--dampings", "0.01", "--seeds", "0,1"]
    argv += ["--plot", str(png)]
    assert cp.main(argv + ["--json", str(out), "--table", str(md)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    report = json.loads(out.read_text())
    for kind in ("mlp", "cnn"):
        res = report["models"][kind]
        cos = res["dampings"][0]["layer_cosine"]
        assert set(cos) == set(cp.APPROXIMATIONS)
        assert cos["layer"] == pytest.approx(1.0)
        assert res["layer_frobenius"]["layer"]["mass_kept"] == pytest.approx(1.0)
        mass = res["layer_frobenius"]
        assert mass["diagonal"]["mass_kept"] < mass["mbf"]["mass_kept"] < 1.0
    text = md.read_text()
    assert "MBF mini-blocks" in text and "Over 2 seeds" in text
    spread = report["across_seeds"]["cnn"]["mbf"]
    assert len(spread["layer mass kept"]) == len(spread["network cos, gamma=0.01"]) == 2
    assert (
        spread["layer mass kept"][0]
        == report["models"]["cnn"]["layer_frobenius"]["mbf"]["mass_kept"]
    )


def test_curvature_bad_arguments_exit_with_a_message(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cp.main(["--examples", "100000"])
    assert exc.value.code == 2
    assert "--examples" in capsys.readouterr().err


def test_theory_methods_subset_and_bad_subset(tmp_path: Path, capsys) -> None:
    out = tmp_path / "t.json"
    argv = ["--data", "random", "--dim", "12", "--n", "5", "--widths", "8", "--iters", "3"]
    assert th.main(argv + ["--methods", "idealized_mbf", "gauss_newton", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"idealized_mbf", "gauss_newton"} <= set(report)
    assert "kfac" not in report and "mbf_chunked" not in report  # d = 12 <= 32: no chunking
    with pytest.raises(SystemExit) as exc:
        th.main(argv + ["--methods", "adam"])
    assert exc.value.code == 2 and "--methods" in capsys.readouterr().err
