"""How well kmlip's per-atom uncertainty finds force errors (issue 10, the README figure).

Protocol (fixed seeds, EMT as the reference, 32-atom fcc cells):

* **Cu**: training frames from 20 short ASE Langevin MD runs with EMT at 600 K (2 fs steps,
  friction 0.02 /fs, two frames 20 steps apart after 100 steps of equilibration), each run in
  a cell with its own small random strain (±2 %); independent runs (other seeds, 10 of two
  frames per set) give the held-out frames: *calibration* (600 K and 1200 K), *ordinary*
  (600 K), *hot* (1200 K), *compressed* (volume −15 %, 600 K).
* **Cu–Au** (Cu-rich: 20 % Au on random sites, a = 3.70 Å): the same sets, plus *pure Au*
  (thermal fcc Au at its own lattice constant, 4.08 Å, 600 K), chemistry never seen pure.

The model (SOAP r_cut 4.5 Å, n_max 6, l_max 4, atom σ 0.5 Å; ζ 4, δ 0.2 eV; 200 CUR sparse
points per species; σ E/F/V 0.002/0.02/0.02) is fitted on the training frames, calibrated
(``model.calibrate``) on held-out MD frames at 600 K and 1200 K, and evaluated on the other
held-out sets: Spearman rank correlation of each per-atom measure (``novelty``,
``energies_var``) and of the calibrated ``uncertainty`` with the per-atom force error |ΔF_i|,
the fraction of force-error components within ±2u, RMS error / RMS u, and the median
uncertainty of each set over that of the training frames. Prints markdown tables; with
matplotlib saves ``benchmarks/out/uncertainty.png``; writes ``benchmarks/out/uncertainty.json``.

Run: ``python benchmarks/uncertainty.py`` (about 1.5 min on 2 cores; ``--quick`` about 20 s,
``--setting cu`` for Cu alone). ``--setting cuau --n-sparse 600`` (every Au environment a
sparse point) shows how the figures move with a better Cu–Au model: its training-like error
floor halves, so the same novelty rise gives a larger uncertainty ratio.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import OUT_DIR, use_repo_kmlip  # noqa: E402

T_TRAIN = 600.0  # K
T_HOT = 1200.0  # K
TIMESTEP_FS = 2.0
FRICTION = 0.02  # 1/fs
EQUILIBRATE = 100  # steps before the first frame
EVERY = 20  # steps between frames
COMPRESSION = 0.85  # volume factor
MEASURES = ("novelty", "energies_var")

LABELS = {"cu": "Cu", "cuau": "Cu–Au (20 % Au)"}
SETTINGS = {
    "cu": {"species": ["Cu"], "a": 3.61, "frac_au": 0.0},
    "cuau": {"species": ["Cu", "Au"], "a": 3.70, "frac_au": 0.2},
}


# -- data ----------------------------------------------------------------------------------------

def md_frames(n_frames: int, seed: int, temperature: float, frac_au: float, a: float,
              volume: float = 1.0, symbol: str | None = None) -> list:
    """EMT Langevin MD frames of a 32-atom fcc cell (see the module docstring).

    Parameters
    ----------
    n_frames : int
    seed : int
        Seeds the species, the strain, the velocities and the thermostat noise.
    temperature : float
        K.
    frac_au : float
        Fraction of Au on random sites (ignored with ``symbol``).
    a : float
        Lattice constant, Å.
    volume : float
        Volume factor applied to the cell (0.85: compressed by 15 %).
    symbol : str, optional
        A pure element instead of the Cu–Au alloy.
    """
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin

    from kmlip.datasets import label

    rng = np.random.default_rng(seed)
    atoms = bulk(symbol or "Cu", "fcc", a=a, cubic=True).repeat((2, 2, 2))
    if symbol is None and frac_au > 0:
        atoms.symbols[rng.random(len(atoms)) < frac_au] = "Au"
    eps = rng.uniform(-0.02, 0.02, (3, 3))
    strain = np.eye(3) + 0.5 * (eps + eps.T)
    atoms.set_cell(atoms.cell.array @ strain.T * volume ** (1 / 3), scale_atoms=True)
    atoms.calc = EMT()
    m = atoms.get_masses()
    p = np.sqrt(m * units.kB * 2 * temperature)[:, None] * rng.standard_normal((len(atoms), 3))
    atoms.set_momenta(p - m[:, None] * p.sum(0) / m.sum())  # 2T: equipartition halves it
    dyn = Langevin(atoms, timestep=TIMESTEP_FS * units.fs, temperature_K=temperature,
                   friction=FRICTION / units.fs, fixcm=False, rng=rng)
    dyn.run(EQUILIBRATE)
    out = []
    for _ in range(n_frames):
        dyn.run(EVERY)
        out.append(label(atoms, EMT()))
    return out


def many(n_runs: int, per_run: int, seed: int, **kw) -> list:
    return [f for k in range(n_runs) for f in md_frames(per_run, seed + 101 * k, **kw)]


def datasets(setting: str, quick: bool) -> dict[str, list]:
    """The frame sets of ``setting`` (see the module docstring)."""
    st = SETTINGS[setting]
    kw = {"frac_au": st["frac_au"], "a": st["a"]}
    # many short runs, two frames each: every run has its own arrangement of Au and strain
    r = 5 if quick else 10
    sets = {
        "train": many(2 * r, 2, 1000, temperature=T_TRAIN, **kw),
        "calibration": many(r, 2, 20000, temperature=T_TRAIN, **kw)
        + many(r, 2, 30000, temperature=T_HOT, **kw),
        "ordinary": many(r, 2, 40000, temperature=T_TRAIN, **kw),
        "hot": many(r, 2, 50000, temperature=T_HOT, **kw),
        "compressed": many(r, 2, 60000, temperature=T_TRAIN, volume=COMPRESSION, **kw),
    }
    if setting == "cuau":
        sets["pure Au"] = many(r, 2, 70000, temperature=T_TRAIN, frac_au=0.0, a=4.08,
                               symbol="Au")
    return sets


# -- model and figures ---------------------------------------------------------------------------

def make_model(setting: str, n_sparse: int):
    from kmlip import SOAP, KernelPotential

    return KernelPotential(
        SOAP(species=SETTINGS[setting]["species"], r_cut=4.5, n_max=6, l_max=4, sigma=0.5),
        zeta=4, delta=0.2, n_sparse=n_sparse, sparse_method="cur", sigma_energy=0.002,
        sigma_force=0.02, sigma_stress=0.02, random_state=0)


def per_atom(model, frames) -> dict[str, np.ndarray]:
    """Force errors (n, 3) eV/Å, uncertainty (n,) eV/Å, the measures (n,) eV² and the cheap
    per-atom force variance ``forces_var_diag`` (n,) eV²/Å², pooled."""
    from kmlip.uncertainty import force_variance_diag

    st = model.fitted_state_
    out = {k: [] for k in ("dF", "uncertainty", *MEASURES, "forces_var_diag")}
    for a in frames:
        r = model.compute(a, ("forces", "uncertainty", *MEASURES))
        out["dF"].append(r.forces - a.get_forces())
        for k in ("uncertainty", *MEASURES):
            out[k].append(getattr(r, k))
        X, G = st.descriptor.transform(a, gradients=True)
        out["forces_var_diag"].append(force_variance_diag(st, a, X, G, r.novelty))
    return {k: np.concatenate(v) for k, v in out.items()}


def measure_table(res: dict) -> dict:
    """For each per-atom measure: the calibration it gets on the calibration frames, and the
    ratios of the median uncertainty of each set to that of the training frames, Spearman and
    coverage on the pooled held-out sets."""
    from kmlip.uncertainty import coverage, fit_calibration, spearman

    data = res["data"]
    out = {}
    for k in (*MEASURES, "forces_var_diag"):
        cal = fit_calibration(k, data["calibration"][k], data["calibration"]["dF"],
                              res["sigma_force"])
        u = {name: cal.uncertainty(d[k]) for name, d in data.items()}
        pooled = data["all held-out"]
        out[k] = {"scale": cal.scale, "floor": cal.floor,
                  "ratio": {name: float(np.median(v) / np.median(u["train"]))
                            for name, v in u.items()},
                  "raw_ratio": {name: float(np.median(d[k]) / np.median(data["train"][k]))
                                for name, d in data.items()},
                  "spearman_held_out": spearman(pooled[k], np.linalg.norm(pooled["dF"], axis=1)),
                  "coverage_held_out": coverage(pooled["dF"], u["all held-out"])}
    return out


def figures(d: dict[str, np.ndarray]) -> dict[str, float]:
    from kmlip.uncertainty import coverage, spearman

    e = np.linalg.norm(d["dF"], axis=1)
    u = d["uncertainty"]
    out = {"n_atoms": int(u.size), "force_rmse": float(np.sqrt(np.mean(d["dF"] ** 2))),
           "spearman_uncertainty": spearman(u, e), "coverage": coverage(d["dF"], u),
           "rms_ratio": float(np.sqrt(np.mean(d["dF"] ** 2)) / np.sqrt(np.mean(u ** 2))),
           "median_uncertainty": float(np.median(u))}
    for k in MEASURES:
        out[f"spearman_{k}"] = spearman(d[k], e)
        out[f"median_{k}"] = float(np.median(d[k]))
    return out


def run_setting(setting: str, args) -> dict:
    from kmlip.uncertainty import Calibration

    t0 = time.process_time()
    sets = datasets(setting, args.quick)
    t_data = time.process_time() - t0
    n_sparse = args.n_sparse or (50 if args.quick else 200)
    model = make_model(setting, n_sparse)
    t0 = time.process_time()
    model.fit(sets["train"])
    t_fit = time.process_time() - t0
    report = model.calibrate(sets["calibration"])
    chosen = model.fitted_state_.uncertainty_map
    # the calibration each measure would get, to compare their coverage on the test sets
    alt = {}
    for k in MEASURES:
        alt[k] = model.calibrate(sets["calibration"], measure=k)
    model.fitted_state_ = model.fitted_state_.replace(calibration=chosen)
    res = {"setting": setting, "n_sparse": n_sparse, "cpu_s": {"data": t_data, "fit": t_fit},
           "calibration": {"chosen": chosen.measure, "scale": chosen.scale,
                           "floor": chosen.floor, "report": report,
                           "per_measure": {k: {kk: alt[k][kk] for kk in
                                               ("scale", "floor", "coverage_after")}
                                           for k in MEASURES}},
           "sets": {}, "data": {}}
    for name, frames in sets.items():
        d = per_atom(model, frames)
        res["sets"][name] = figures(d)
        res["data"][name] = d
    tests = [k for k in sets if k not in ("train", "calibration")]
    pooled = {k: np.concatenate([res["data"][s][k] for s in tests]) for k in res["data"]["hot"]}
    res["sets"]["all held-out"] = figures(pooled)
    res["data"]["all held-out"] = pooled
    res["sigma_force"] = model.fitted_state_.hyper.sigma_force
    res["measures"] = measure_table(res)
    # coverage on the pooled held-out sets with each measure's own calibration
    for k in MEASURES:
        c = Calibration(k, alt[k]["scale"], alt[k]["floor"], 1, None)
        from kmlip.uncertainty import coverage

        res["calibration"]["per_measure"][k]["coverage_held_out"] = coverage(
            pooled["dF"], c.uncertainty(pooled[k]))
        res["calibration"]["per_measure"][k]["coverage_compressed"] = coverage(
            res["data"]["compressed"]["dF"], c.uncertainty(res["data"]["compressed"][k]))
    return res


# -- output --------------------------------------------------------------------------------------

def markdown(res: dict) -> str:
    sets = res["sets"]
    tr = sets["train"]
    lines = [f"**{res['setting']}** ({res['n_sparse']} sparse points per species; uncertainty "
             f"calibrated on {res['calibration']['report']['n_atoms']} held-out atoms, measure "
             f"`{res['calibration']['chosen']}`, u = sqrt({res['calibration']['floor']:.3g}² + "
             f"{res['calibration']['scale']:.3g}² m) eV/Å)", "",
             "| frames | atoms | force RMSE (meV/Å) | Spearman novelty | Spearman energies_var "
             "| Spearman uncertainty | within ±2u | RMS err / RMS u | median u (meV/Å) "
             "| median u / training | median novelty / training "
             "| median energies_var / training |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in sets.items():
        lines.append(
            f"| {name} | {f['n_atoms']} | {1e3 * f['force_rmse']:.1f} "
            f"| {f['spearman_novelty']:.2f} | {f['spearman_energies_var']:.2f} "
            f"| {f['spearman_uncertainty']:.2f} | {100 * f['coverage']:.1f} % "
            f"| {f['rms_ratio']:.2f} | {1e3 * f['median_uncertainty']:.1f} "
            f"| {f['median_uncertainty'] / tr['median_uncertainty']:.2f} "
            f"| {f['median_novelty'] / tr['median_novelty']:.3g} "
            f"| {f['median_energies_var'] / tr['median_energies_var']:.3g} |")
    pm = res["calibration"]["per_measure"]
    lines += ["", "| calibrated on | a (1/Å) | b (eV/Å) | within ±2u: calibration "
              "| all held-out | compressed |", "|---|---|---|---|---|---|"]
    for k, v in pm.items():
        lines.append(f"| {k} | {v['scale']:.4g} | {v['floor']:.4g} "
                     f"| {100 * v['coverage_after']:.1f} % | {100 * v['coverage_held_out']:.1f} % "
                     f"| {100 * v['coverage_compressed']:.1f} % |")
    novel = [k for k in ("compressed", "pure Au") if k in sets]
    lines += ["", "Each measure calibrated on the calibration frames (u = sqrt(b² + a² m), "
              "b <= σ_F): "
              "median u of a set / median u of the training frames (raw measure ratio in "
              "brackets), and on all held-out sets pooled",
              "", "| measure | " + " | ".join(f"{k} / training" for k in novel)
              + " | Spearman | within ±2u |", "|---|" + "---|" * (len(novel) + 2)]
    for k, v in res["measures"].items():
        lines.append(f"| {k} | " + " | ".join(
            f"{v['ratio'][n]:.2f}× ({v['raw_ratio'][n]:.3g}×)" for n in novel)
            + f" | {v['spearman_held_out']:.2f} | {100 * v['coverage_held_out']:.1f} % |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, dpi: int = 110) -> bool:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(5.2 * len(results), 9), layout="constrained")
    axes = fig.subplots(2, len(results), squeeze=False)
    colors = {"ordinary": "C0", "hot": "C1", "compressed": "C3", "pure Au": "C2"}
    for col, res in enumerate(results):
        ax, bx = axes[0, col], axes[1, col]
        for name, c in colors.items():
            if name not in res["data"]:
                continue
            d = res["data"][name]
            e = np.linalg.norm(d["dF"], axis=1) / np.sqrt(3)  # RMS component: comparable to u
            f = res["sets"][name]
            ax.scatter(d["uncertainty"], e, s=5, alpha=0.5, color=c, edgecolors="none",
                       label=f"{name}: ρ {f['spearman_uncertainty']:.2f}, "
                             f"{100 * f['coverage']:.0f} % in ±2u")
            order = np.argsort(d["uncertainty"])
            xs, ys = [], []
            for idx in np.array_split(order, 8):
                xs.append(np.sqrt(np.mean(d["uncertainty"][idx] ** 2)))
                ys.append(np.sqrt(np.mean(d["dF"][idx] ** 2)))
            bx.plot(xs, ys, "o-", color=c, label=name)
        pooled = res["data"]["all held-out"]
        lo = float(min(pooled["uncertainty"].min(), 1e-3))
        hi = float(max(pooled["uncertainty"].max(), np.abs(pooled["dF"]).max()))
        grid = np.geomspace(lo, hi, 50)
        for a_ in (ax, bx):
            a_.plot(grid, grid, "k--", lw=0.8, label="error = u")
        ax.plot(grid, 2 * grid, "k-", lw=0.8, label="error = 2u")
        f = res["sets"]["all held-out"]
        ax.set(xscale="log", yscale="log", xlabel="per-atom uncertainty u (eV/Å)",
               ylabel="per-atom force error |ΔF_i|/√3 (eV/Å)",
               title=f"{LABELS[res['setting']]}: held-out ρ {f['spearman_uncertainty']:.2f}, "
                     f"{100 * f['coverage']:.1f} % in ±2u")
        ax.legend(fontsize=7, loc="upper left")
        bx.set(xscale="log", yscale="log", xlabel="RMS u in bin (eV/Å)",
               ylabel="RMS force-error component in bin (eV/Å)",
               title="binned by u (8 equal-count bins per set)")
        bx.legend(fontsize=7, loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    try:
        from PIL import Image
    except ImportError:
        path.write_bytes(buf.getvalue())
        return True
    # a palette PNG is a quarter of the size, which matters for the copy kept in the docs
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=128, method=Image.Quantize.FASTOCTREE,
                                            dither=Image.Dither.NONE).save(path, optimize=True)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer frames and sparse points")
    p.add_argument("--setting", choices=["cu", "cuau", "both"], default="both",
                   help="which system (default: both)")
    p.add_argument("--n-sparse", type=int, default=None,
                   help="sparse points per species (default: 200, --quick 50)")
    p.add_argument("--figure", type=Path, default=OUT_DIR / "uncertainty.png",
                   help="where the PNG goes (default: benchmarks/out/uncertainty.png; the "
                        "README's copy is docs/_static/uncertainty.png at --dpi 60)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the PNG (default 110)")
    args = p.parse_args(argv)
    use_repo_kmlip()
    import kmlip

    print(f"kmlip {kmlip.__version__}; EMT MD at {T_TRAIN:g} K (hot {T_HOT:g} K), "
          f"{TIMESTEP_FS:g} fs steps, frames every {EVERY} steps; compressed = volume × "
          f"{COMPRESSION}{'; --quick' if args.quick else ''}")
    results = []
    for setting in (["cu", "cuau"] if args.setting == "both" else [args.setting]):
        t0 = time.perf_counter()
        res = run_setting(setting, args)
        results.append(res)
        print()
        print(markdown(res))
        print(f"\n({setting}: {time.perf_counter() - t0:.0f} s wall; fit "
              f"{res['cpu_s']['fit']:.0f} CPU-s, EMT data {res['cpu_s']['data']:.0f} CPU-s)")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUT_DIR / "uncertainty.json", "w") as fh:
        json.dump([{k: v for k, v in r.items() if k != "data"} for r in results], fh, indent=1,
                  default=float)
    png = args.figure
    print(f"\nwrote {png}" if plot(results, png, args.dpi)
          else "\nmatplotlib not installed: no figure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
