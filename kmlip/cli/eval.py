"""``kmlip eval``: errors of a model on labelled structures, and how well its uncertainty
predicts them (optionally calibrating it)."""
from __future__ import annotations

import argparse
import math
import os

import numpy as np

from kmlip.cli._files import check_output, check_readable, first_line, load_model, read_structures
from kmlip.uncertainty import predicted_measures

DESCRIPTION = (
    "Compare a model's predictions with the labels of structures the model was not trained on: "
    "MAE and RMSE of the energy per atom (meV/atom), of the force components per species "
    "(meV/Å) and of the stress components of periodic cells (meV/Å³); and how well the per-atom "
    "'uncertainty' (eV/Å, the model's estimate of each atom's force error) predicts the actual "
    "errors: Spearman rank correlation with the per-atom force error |ΔF_i|, the fraction of "
    "force-error components within ±2 uncertainty (0.95 for calibrated Gaussian errors) and the "
    "ratio of the RMS force error to the RMS uncertainty (1 when calibrated). With --calibrate "
    "the uncertainty is calibrated on these structures (KernelPotential.calibrate), the figures "
    "are printed before and after, and the calibrated model is written to -o.")

#: the per-atom measures reported beside the calibrated uncertainty: those the prediction path
#: computes (``forces_var_diag`` joins once the model computes it)
MEASURES = predicted_measures()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file written by 'kmlip fit' or KernelPotential.save")
    p.add_argument("structures", help="labelled structures (energies and forces, stresses for "
                                      "periodic cells; any file ASE can read, e.g. extxyz), "
                                      "all frames are used")
    p.add_argument("--format", default=None, metavar="NAME",
                   help="ASE format name of the structures file, e.g. extxyz "
                        "(default: guessed from the file name and content)")
    p.add_argument("--plot-dir", default=None, metavar="DIR",
                   help="write parity.png (energy per atom and force components, predicted vs "
                        "reference) and calibration.png (force-error components vs uncertainty, "
                        "log-log, with the ±2u line; binned RMS error vs RMS uncertainty) to this "
                        "directory, created if missing (its parent must exist); needs "
                        "matplotlib (pip install 'kmlip[plot]'), otherwise the plots are "
                        "skipped with a one-line note (default: no plots)")
    p.add_argument("--calibrate", action="store_true",
                   help="calibrate the per-atom uncertainty on these structures (they must not "
                        "be training structures), print the figures before and after, and "
                        "write the calibrated model to -o (default: off)")
    p.add_argument("--measure", default="auto", choices=["auto", *MEASURES],
                   help="with --calibrate: the per-atom measure the uncertainty is built on; "
                        "'auto' takes the one that ranks the force errors best (Spearman) "
                        "(default: %(default)s)")
    p.add_argument("-o", "--output", default=None, metavar="PATH",
                   help="with --calibrate: where the calibrated model is written (exactly this "
                        "path, atomically; naming the input model overwrites it) "
                        "(default: none; required with --calibrate)")


# -- the numbers ---------------------------------------------------------------------------------

def _stats(d: np.ndarray) -> tuple[float, float]:
    return float(np.mean(np.abs(d))), float(np.sqrt(np.mean(d * d)))


def collect(model, frames, path: str) -> dict:
    """Predictions against labels for every frame, in one prediction pass per frame.

    Returns
    -------
    dict
        ``dE`` (per-atom energy errors, eV/atom), ``dS`` (stress component errors, eV/Å³),
        ``E_ref``/``E_pred`` (eV/atom), and for frames with force labels ``dF`` (n, 3) eV/Å,
        ``F_ref``/``F_pred`` (n, 3), ``species`` (n,), ``uncertainty`` (n,) eV/Å and the
        measures ``novelty``/``energies_var`` (n,) eV².
    """
    from kmlip import labels as lab

    keys = lab.LabelKeys(model.energy_key, model.forces_key, model.stress_key)
    out = {k: [] for k in ("dE", "E_ref", "E_pred", "dS", "dF", "F_ref", "F_pred", "species",
                           "uncertainty", *MEASURES)}
    for k, a in enumerate(frames):
        where = f"structure {k}"
        try:
            has_e = lab.has_label(a, keys.energy_key, "info")
            has_f = lab.has_label(a, keys.forces_key, "arrays")
            has_s = lab.is_periodic(a) and lab.has_label(a, keys.stress_key, "info")
            props = ["energy"]
            if has_f:
                props += ["forces", "uncertainty", *MEASURES]
            if has_s:
                props.append("stress")
            r = model.compute(a, props)
            if has_e:
                e = lab.read_energy(a, keys.energy_key, where) / len(a)
                out["E_ref"].append(e)
                out["E_pred"].append(r.energy / len(a))
                out["dE"].append(r.energy / len(a) - e)
            if has_f:
                f = lab.read_forces(a, keys.forces_key, where)
                out["F_ref"].append(f)
                out["F_pred"].append(r.forces)
                out["dF"].append(r.forces - f)
                out["species"].append(np.array(a.get_chemical_symbols()))
                for name in ("uncertainty", *MEASURES):
                    out[name].append(getattr(r, name))
            if has_s:
                out["dS"].append(r.stress - lab.read_stress(a, keys.stress_key, where))
        except (ValueError, TypeError) as exc:
            msg = first_line(exc)
            raise ValueError(f"{path}: {msg if msg.startswith(where) else f'{where}: {msg}'}"
                             ) from None
    res = {}
    for name, v in out.items():
        if name in ("E_ref", "E_pred", "dE"):
            res[name] = np.asarray(v, dtype=np.float64)
        elif name in ("dF", "F_ref", "F_pred"):
            res[name] = np.concatenate(v) if v else np.zeros((0, 3))
        elif name == "species":
            res[name] = np.concatenate(v) if v else np.zeros(0, dtype=str)
        else:
            res[name] = np.concatenate(v) if v else np.zeros(0)
    return res


def uncertainty_figures(dF: np.ndarray, u: np.ndarray) -> dict:
    """Spearman of ``u`` vs |ΔF_i|, coverage of ±2u and RMS(error)/RMS(u).

    Parameters
    ----------
    dF : ndarray, shape (n_atoms, 3)
        Force errors, eV/Å.
    u : ndarray, shape (n_atoms,)
        Per-atom uncertainty (standard deviation of each force component), eV/Å.
    """
    from kmlip.uncertainty import coverage, spearman

    e_atom = np.linalg.norm(dF, axis=1)
    rms_u = float(np.sqrt(np.mean(u * u)))
    return {"spearman": spearman(u, e_atom), "coverage": coverage(dF, u),
            "rms_ratio": float(np.sqrt(np.mean(dF * dF))) / rms_u if rms_u > 0 else math.inf,
            "median_u": float(np.median(u))}


def _fmt(x: float, spec: str = ".3f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def print_errors(res: dict) -> None:
    rows = []
    if res["dE"].size:
        rows.append(("energy per atom", "meV/atom", res["dE"].size, *_stats(1e3 * res["dE"])))
    if res["dF"].size:
        rows.append(("forces (all)", "meV/Å", res["dF"].size, *_stats(1e3 * res["dF"])))
        for s in sorted(set(res["species"].tolist())):
            d = res["dF"][res["species"] == s]
            rows.append((f"forces {s}", "meV/Å", d.size, *_stats(1e3 * d)))
    if res["dS"].size:
        rows.append(("stress", "meV/Å³", res["dS"].size, *_stats(1e3 * np.ravel(res["dS"]))))
    if not rows:
        print("no labels to compare with (no energies, forces or stresses in the file)")
        return
    print(f"{'quantity':<18} {'unit':<9} {'n':>7} {'MAE':>10} {'RMSE':>10}")
    for name, unit, n, mae, rmse in rows:
        print(f"{name:<18} {unit:<9} {n:>7d} {mae:>10.3f} {rmse:>10.3f}")


def print_uncertainty(rows: list[tuple[str, dict]]) -> None:
    """One line per (label, figures) pair; figures without ``coverage`` are raw measures
    (only their ranking means anything; their median is in eV)."""
    print(f"{'per-atom':<32} {'Spearman':>9} {'within ±2u':>11} "
          f"{'RMS err/RMS u':>14} {'median':>13}")
    for name, f in rows:
        if "coverage" in f:
            cov, ratio = _fmt(100 * f["coverage"], ".1f") + " %", _fmt(f["rms_ratio"], ".2f")
            med = _fmt(f["median_u"], ".4f") + " eV/Å"
        else:
            cov, ratio, med = "-", "-", _fmt(f["median_u"], ".2e") + " eV"
        print(f"{name:<32} {_fmt(f['spearman']):>9} {cov:>11} {ratio:>14} {med:>13}")


def _describe(cal) -> str:
    if cal.n_atoms == 0:
        return (f"uncalibrated default: u = sqrt({cal.floor:.4g}² + {cal.scale:.4g}² × "
                f"{cal.measure})")
    return (f"calibrated on {cal.n_atoms} atoms: u = sqrt({cal.floor:.4g}² eV²/Å² + "
            f"{cal.scale:.4g}² Å⁻² × {cal.measure})")


# -- plots ---------------------------------------------------------------------------------------

def _save(fig, path: str) -> None:
    from kmlip.io import atomic_write

    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))


def write_plots(res: dict, directory: str) -> list[str]:
    """parity.png and calibration.png in ``directory``; returns the paths written."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    os.makedirs(directory, exist_ok=True)
    written = []
    panels = [p for p in (("energy", res["E_ref"], res["E_pred"], "eV/atom"),
                          ("forces", res["F_ref"].ravel(), res["F_pred"].ravel(), "eV/Å"))
              if p[1].size]
    if panels:
        fig = Figure(figsize=(5 * len(panels), 4.6), layout="constrained")
        for ax, (name, ref, pred, unit) in zip(fig.subplots(1, len(panels), squeeze=False)[0],
                                               panels, strict=True):
            ax.scatter(ref, pred, s=6, alpha=0.6, edgecolors="none")
            lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
            mae, rmse = _stats(pred - ref)
            ax.set(xlabel=f"reference {name} ({unit})", ylabel=f"predicted {name} ({unit})",
                   title=f"{name}: MAE {mae:.3g}, RMSE {rmse:.3g} {unit}")
            ax.set_aspect("equal", adjustable="datalim")
        path = os.path.join(directory, "parity.png")
        _save(fig, path)
        written.append(path)
    if res["dF"].size:
        u, dF = res["uncertainty"], res["dF"]
        fig = Figure(figsize=(10, 4.6), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        uu = np.repeat(u, 3)
        err = np.maximum(np.abs(dF).ravel(), 1e-6)  # log axes: keep exact zeros visible
        ax1.scatter(uu, err, s=4, alpha=0.4, edgecolors="none")
        grid = np.geomspace(max(float(u.min()), 1e-6), float(u.max()) * 1.05 + 1e-12, 50)
        ax1.plot(grid, grid, "k--", lw=0.8, label="|ΔF| = u")
        ax1.plot(grid, 2 * grid, "r-", lw=1, label="|ΔF| = 2u")
        f = uncertainty_figures(dF, u)
        ax1.set(xscale="log", yscale="log", xlabel="per-atom uncertainty u (eV/Å)",
                ylabel="|force-error component| (eV/Å)",
                title=f"{100 * f['coverage']:.1f} % within ±2u, Spearman {_fmt(f['spearman'])}")
        ax1.legend(loc="lower right")
        # binned: RMS error against RMS uncertainty in bins of equal counts of atoms
        order = np.argsort(u)
        n_bins = int(min(15, max(1, u.size // 10)))
        xs, ys = [], []
        for idx in np.array_split(order, n_bins):
            xs.append(float(np.sqrt(np.mean(u[idx] ** 2))))
            ys.append(float(np.sqrt(np.mean(dF[idx] ** 2))))
        ax2.plot(xs, ys, "o-", label=f"{n_bins} bins of equal size")
        lo, hi = min(xs + ys), max(xs + ys)
        ax2.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="calibrated")
        ax2.set(xscale="log", yscale="log", xlabel="RMS uncertainty in bin (eV/Å)",
                ylabel="RMS force-error component in bin (eV/Å)",
                title=f"RMS error / RMS u = {_fmt(f['rms_ratio'], '.2f')}")
        ax2.legend(loc="lower right")
        path = os.path.join(directory, "calibration.png")
        _save(fig, path)
        written.append(path)
    return written


def _check_plot_dir(directory: str) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory}: --plot-dir is a file, not a directory")
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(directory) and not os.path.isdir(parent):
        raise ValueError(f"{directory}: parent directory {parent} does not exist")
    target = directory if os.path.isdir(directory) else parent
    if not os.access(target, os.W_OK | os.X_OK):  # found now, not after the predictions
        raise ValueError(f"{directory}: cannot write to directory {target} (permission denied)")


# -- command -------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    if args.calibrate and not args.output:
        raise ValueError("--calibrate needs -o PATH, the file the calibrated model is written to "
                         "(name the input model to overwrite it)")
    if args.output and not args.calibrate:
        raise ValueError("-o is only used with --calibrate (eval itself writes no model)")
    if args.measure != "auto" and not args.calibrate:
        raise ValueError("--measure is only used with --calibrate")
    if args.output:
        check_output(args.output, {"structures file": args.structures})  # the model: allowed
    if args.plot_dir:
        _check_plot_dir(args.plot_dir)
    check_readable(args.model, "model file")
    frames = read_structures(args.structures, format=args.format)
    model = load_model(args.model)
    res = collect(model, frames, args.structures)
    print(f"{len(frames)} structures, {sum(len(a) for a in frames)} atoms from "
          f"{args.structures}")
    print_errors(res)
    cal = model.fitted_state_.uncertainty_map
    if res["dF"].size == 0:
        if args.calibrate:
            raise ValueError(f"{args.structures}: no force labels to calibrate the uncertainty on")
        print("no force labels: the uncertainty cannot be compared with errors")
    else:
        print()
        print(f"uncertainty: {_describe(cal)}")
        before = uncertainty_figures(res["dF"], res["uncertainty"])
        rows = [(f"uncertainty ({'calibrated' if cal.n_atoms else 'uncalibrated'}, eV/Å)",
                 before)]
        for name in MEASURES:  # the raw measures: only their ranking means anything
            f = uncertainty_figures(res["dF"], np.sqrt(np.maximum(res[name], 0.0)))
            rows.append((f"sqrt({name}) (raw measure)",
                         {"spearman": f["spearman"], "median_u": f["median_u"]}))
        if args.calibrate:
            report = model.calibrate(frames, measure=args.measure)
            new = model.fitted_state_.uncertainty_map
            u_new = new.uncertainty(res[new.measure])
            after = uncertainty_figures(res["dF"], u_new)
            res["uncertainty"] = u_new
            rows.insert(1, ("uncertainty after (eV/Å)", after))
            rows[0] = ("uncertainty before (eV/Å)", before)
            print(f"now {_describe(new)} (measure {report['measure']!r}; figures 'after' are "
                  "on the calibration atoms themselves)")
        print_uncertainty(rows)
        if args.calibrate:
            model.save(args.output)
            print(f"wrote the calibrated model to {args.output}")
    if args.plot_dir:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("plots skipped: matplotlib is not installed (pip install 'kmlip[plot]')")
        else:
            for path in write_plots(res, args.plot_dir):
                print(f"wrote {path}")
    return 0
