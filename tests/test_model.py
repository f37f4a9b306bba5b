"""The DeepSpot2Cell module against an independent, layer-by-layer recomputation."""

import pytest
import torch
import torch.nn.functional as F

from napari_deepspot2cell.model import CellOutput, DeepSpot2Cell, log1p_normalise, seed_everything

D, H, G = 6, 4, 5


def _model(aggregate, n_ensemble=3, seed=0, **kw):
    return DeepSpot2Cell(D, G, n_ensemble=n_ensemble, phi2rho_size=H, aggregate=aggregate, seed=seed, **kw)


# ---------------------------------------------------------------- the reference, by hand
# Written from the method's description with plain tensor ops on the state dict: no
# method of the module is used, so a wrong layer order, key name, ensemble
# combination or mask convention in the module shows up as a mismatch.


def _lin(sd, prefix, x):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def _phi(sd, name, n, x):
    outs = []
    for i in range(n):
        a = torch.relu(_lin(sd, f"{name}.{i}.model.0", x))  # Linear(d,d), (dropout), ReLU
        outs.append(torch.relu(_lin(sd, f"{name}.{i}.model.3", a)))  # Linear(d,h), (dropout), ReLU
    ordered = torch.stack(outs, 0).sort(0).values
    return ordered[(n - 1) // 2]  # the median (lower middle for an even count, as torch.median)


def _rho_member(sd, i, z, counts):
    a = torch.relu(_lin(sd, f"rho.{i}.model.1", z))
    o = _lin(sd, f"rho.{i}.model.3", a)
    return F.softplus(o) if counts else torch.relu(o)


def _normalise(r):
    total = r.sum()
    return torch.zeros_like(r) if total == 0 else torch.log1p(1e4 * r / total)


def _context(sd, n, own, neighbours, missing):
    own_code = _phi(sd, "phi_spot", n, own)
    valid = [_phi(sd, "phi_spot", n, neighbours[k]) for k in range(len(neighbours)) if not missing[k]]
    mean = torch.stack(valid).sum(0) / len(valid) if valid else torch.zeros(H, dtype=own.dtype)
    return torch.cat([own_code, mean])


def reference_spot(sd, n, counts, cells, mask, own, neighbours, missing):
    ctx = _context(sd, n, own, neighbours, missing)
    zs = [torch.cat([_phi(sd, "phi_cell", n, cells[c]), ctx]) for c in range(len(cells)) if mask[c]]
    if not counts:
        z = torch.stack(zs).sum(0) if zs else torch.zeros(3 * H, dtype=own.dtype)
        return torch.stack([_rho_member(sd, i, z, False) for i in range(n)]).mean(0)
    total = torch.zeros(G, dtype=own.dtype)
    for z in zs:
        total = total + torch.stack([_rho_member(sd, i, z, True) for i in range(n)]).mean(0)
    return _normalise(total)


def reference_cell(sd, n, counts, cell, own, neighbours, missing):
    z = torch.cat([_phi(sd, "phi_cell", n, cell), _context(sd, n, own, neighbours, missing)])
    members = [_rho_member(sd, i, z, counts) for i in range(n)]
    if counts:
        rates = torch.stack(members).mean(0)
        each = torch.stack([_normalise(m) for m in members])
        return _normalise(rates), ((each - each.mean(0)) ** 2).mean(0).sqrt(), rates
    clamped = torch.stack([m.clamp(min=0) for m in members])
    mean = torch.stack(members).mean(0).clamp(min=0)
    return mean, ((clamped - clamped.mean(0)) ** 2).mean(0).sqrt(), None


def _batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    cells = torch.randn(3, 4, D, generator=g, dtype=dtype)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    own = torch.randn(3, D, generator=g, dtype=dtype)
    neighbours = torch.randn(3, 6, D, generator=g, dtype=dtype)
    missing = torch.tensor(
        [[0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool
    )  # spot 2 has no valid neighbour
    return cells, mask, own, neighbours, missing


@pytest.mark.parametrize("n_ensemble", [3, 4])
@pytest.mark.parametrize("aggregate", ["codes", "counts"])
def test_reference_forward_single_cell(aggregate, n_ensemble):
    model = _model(aggregate, n_ensemble=n_ensemble).double().eval()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    counts = aggregate == "counts"
    cells, mask, own, neighbours, missing = _batch()
    with torch.no_grad():
        spot = model.forward_spot(cells, mask, own, neighbours, missing)
        assert spot.shape == (3, G)
        for b in range(3):
            want = reference_spot(sd, n_ensemble, counts, cells[b], mask[b], own[b], neighbours[b], missing[b])
            torch.testing.assert_close(spot[b], want, atol=1e-6, rtol=0)
            # every cell slot, masked or not, predicted with its spot's context
            c = cells.shape[1]
            out = model.forward_cells(
                cells[b], own[b].expand(c, -1), neighbours[b].expand(c, -1, -1), missing[b].expand(c, -1)
            )
            assert isinstance(out, CellOutput)
            for i in range(c):
                mean, spread, rates = reference_cell(sd, n_ensemble, counts, cells[b, i], own[b], neighbours[b], missing[b])
                torch.testing.assert_close(out.mean[i], mean, atol=1e-6, rtol=0)
                torch.testing.assert_close(out.spread[i], spread, atol=1e-6, rtol=0)
                if counts:
                    torch.testing.assert_close(out.rates[i], rates, atol=1e-6, rtol=0)
                else:
                    assert out.rates is None


def test_state_dict_keys_match_the_reference_layout():
    model = DeepSpot2Cell(D, G, n_ensemble=2, phi2rho_size=H, aggregate="codes", n_ensemble_rho=3)
    want = {}
    for name in ("phi_spot", "phi_cell"):
        for i in range(2):
            want[f"{name}.{i}.model.0.weight"] = (D, D)
            want[f"{name}.{i}.model.0.bias"] = (D,)
            want[f"{name}.{i}.model.3.weight"] = (H, D)
            want[f"{name}.{i}.model.3.bias"] = (H,)
    for i in range(3):
        want[f"rho.{i}.model.1.weight"] = (3 * H, 3 * H)
        want[f"rho.{i}.model.1.bias"] = (3 * H,)
        want[f"rho.{i}.model.3.weight"] = (G, 3 * H)
        want[f"rho.{i}.model.3.bias"] = (G,)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    assert isinstance(model.rho[0].model[4], torch.nn.ReLU)
    assert isinstance(_model("counts").rho[0].model[4], torch.nn.Softplus)
    assert model.rho[0].model[5].p == pytest.approx(0.1)
    assert model.phi_cell[0].model[1].p == pytest.approx(0.3)


def test_seed_makes_construction_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = _model("counts", seed=7), _model("counts", seed=7), _model("counts", seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    seed_everything(3)
    x = torch.rand(4)
    seed_everything(3)
    assert torch.equal(torch.rand(4), x)


def test_prediction_from_cached_codes_equals_forward_cells():
    model = _model("counts").eval()
    cells, mask, own, neighbours, missing = _batch(torch.float32)
    with torch.no_grad():
        direct = model.forward_cells(cells[0], own[:1].expand(4, -1), neighbours[:1].expand(4, -1, -1), missing[:1].expand(4, -1))
        spot_codes = model.spot_codes(torch.cat([own[:1], neighbours[0]]))  # once per spot
        ctx = model.combine_context(spot_codes[:1], spot_codes[1:].unsqueeze(0), missing[:1])
        cached = model.forward_cells_from_codes(model.cell_codes(cells[0]), ctx.expand(4, -1))
    for x, y in zip(direct, cached):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_counts_spot_is_the_normalised_sum_of_its_cells_rates():
    model = _model("counts").eval()
    cells, mask, own, neighbours, missing = _batch(torch.float32)
    with torch.no_grad():
        spot = model.forward_spot(cells, mask, own, neighbours, missing)
        out = model.forward_cells(cells[0], own[:1].expand(4, -1), neighbours[:1].expand(4, -1, -1), missing[:1].expand(4, -1))
    torch.testing.assert_close(spot[0], log1p_normalise(out.rates[mask[0]].sum(0)), atol=1e-5, rtol=1e-5)
    assert (out.rates >= 0).all() and (out.spread >= 0).all()


def test_padding_values_never_leak_into_the_spot():
    cells, mask, own, neighbours, missing = _batch(torch.float32)
    for aggregate in ("codes", "counts"):
        model = _model(aggregate).eval()
        with torch.no_grad():
            clean = model.forward_spot(cells, mask, own, neighbours, missing)
            padded = cells.masked_fill(~mask.unsqueeze(-1), float("nan"))
            assert torch.equal(model.forward_spot(padded, mask, own, neighbours, missing), clean)
            # a missing neighbour's embedding does not matter either
            noisy = neighbours.masked_fill(missing.unsqueeze(-1), 1e3)
            torch.testing.assert_close(model.forward_spot(cells, mask, own, noisy, missing), clean)


def test_counts_spot_with_all_rates_zero_stays_finite_with_finite_gradients():
    model = _model("counts").eval()
    with torch.no_grad():
        for r in model.rho:
            r.model[3].bias.fill_(-1e4)  # softplus underflows to exactly 0
    cells, mask, own, neighbours, missing = _batch(torch.float32)
    spot = model.forward_spot(cells, mask, own, neighbours, missing)
    assert torch.isfinite(spot).all() and torch.equal(spot, torch.zeros_like(spot))
    spot.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    out = model.forward_cells(cells[0], own[:1].expand(4, -1), neighbours[:1].expand(4, -1, -1), missing[:1].expand(4, -1))
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.spread).all()


def test_codes_cells_are_non_negative_and_a_lone_cell_equals_its_spot():
    model = _model("codes").eval()
    cells, mask, own, neighbours, missing = _batch(torch.float32)
    with torch.no_grad():
        spot = model.forward_spot(cells, mask, own, neighbours, missing)
        out = model.forward_cells(cells[2, :1], own[2:], neighbours[2:], missing[2:])
    assert (out.mean >= 0).all()
    torch.testing.assert_close(out.mean[0], spot[2].clamp(min=0))


def test_dropout_only_in_training_mode():
    model = _model("counts", p=0.5)
    cells, mask, own, neighbours, missing = _batch(torch.float32)
    a = model.forward_spot(cells, mask, own, neighbours, missing)
    b = model.forward_spot(cells, mask, own, neighbours, missing)
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(cells, mask, own, neighbours, missing), model(cells, mask, own, neighbours, missing))


@pytest.mark.parametrize("aggregate", ["codes", "counts"])
def test_a_few_optimiser_steps_fit_spot_targets(aggregate):
    seed_everything(0)
    model = _model(aggregate, p=0.0)
    cells, mask, own, neighbours, missing = _batch(torch.float32)
    target = torch.log1p(1e4 * torch.softmax(torch.randn(3, G), -1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-6)

    def loss():
        pred = model.forward_spot(cells, mask, own, neighbours, missing)
        return F.mse_loss(pred[[0, 2]], target[[0, 2]])  # spot 1 has no cell to explain it

    first = loss().item()
    for _ in range(60):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert loss().item() < 0.5 * first


def test_bad_arguments():
    with pytest.raises(ValueError, match="aggregate"):
        DeepSpot2Cell(D, G, aggregate="sum")
    with pytest.raises(ValueError, match="output_size"):
        DeepSpot2Cell(D, 0)
