"""On-the-fly (active) learning: MD with the model, the reference calculator where it is unsure.

:func:`learn_on_the_fly` runs molecular dynamics with a :class:`~kmlip.model.KernelPotential`
and watches the per-atom ``uncertainty`` (eV/Å, an estimate of each atom's force error) through
an :class:`~kmlip.active.gate.UncertaintyGate`. When an atom passes the threshold, the reference
ASE calculator (EMT, tblite, a DFT code, ...) labels that frame; the model then takes

* its energy, forces and stress as new **rows** of the per-class QR factors, and
* the environments of its most uncertain atoms as new **columns** (sparse points),

without a refit from scratch (:mod:`kmlip.gp.columns`: the learner keeps the unit kernel rows of
its few labelled frames in a :class:`~kmlip.gp.columns.RowCache`), re-optimises the
hyperparameters within bounds, and the MD continues from that frame.

Sums of kernels
---------------
``model=KernelPotential([Distance2b(...), SOAP(...)], zeta=[None, 4], delta=[...])`` learns
GAP's two-body + SOAP model: the template's descriptors, ζ, δ and e0 are used and the learner
picks every term's sparse points (see :meth:`_Learner.new_points`: atom-centred terms as above,
a Distance2b term a θ/2 grid of the pair distances it meets, grown with the uncertain atoms'
pairs). The gate reads the per-atom novelty of the sum (the terms' projected-process
variances of the atom's energy, added up).

Run directory
-------------
``model.kmlip`` (the current model, with its QR factors), ``reference.extxyz`` (every labelled
frame: its labels, momenta, the MD step and the model's uncertainty and errors before the update),
``trajectory.extxyz`` (every ``trajectory_interval``-th step, with the model's energy and forces
and the per-atom ``uncertainty``), ``log`` (settings, every reference call, the outcome) and
``manifest.json`` (MD state and counts, written last). Every file except the appended log and
trajectory is written to a temporary file and renamed; the trajectory is cut back to the length
recorded with the MD state on resume. A run killed at any moment (``kill -9``) resumes from its
last consistent state without losing or repeating a reference call: a labelled frame reaches
``reference.extxyz`` before the model is updated, and a frame there that the model has not taken
yet is taken on resume. The only call that can repeat is one that was interrupted before its
result was written.

Defaults (stated in the log)
----------------------------
SOAP with r_cut 4.5 Å, n_max 6, l_max 4 over the elements present, ζ = 4; label noise starting at
σ_E 2 meV/atom, σ_F 50 meV/Å, σ_V 5 meV/atom (stress only for periodic structures), re-optimised
within :data:`DEFAULT_BOUNDS` after every update once the model holds two frames (σ_F >= 10
meV/Å: a gate relative to a σ_F fitted to a smooth reference far below DFT's noise would call
the reference for errors nobody needs). The gate trips when an atom's uncertainty exceeds
``relative_threshold`` (3) times σ_F on the uncalibrated map ``u = sqrt(σ_F² + novelty)``
(:mod:`kmlip.uncertainty`), i.e. at a novelty of ``(3² - 1) σ_F²`` (1.5 times while the model
holds a single frame, whose hyperparameters are guesses); the value is stated in the log in the
units of the calibrated uncertainty. An update adds the environments of up to
``max_new_points`` (32) atoms whose uncertainty exceeds half the threshold, most uncertain first,
skipping near-duplicates of each other and of the existing sparse points.

Calibration (``calibrate=True``, the default), so that the model it returns carries one:

* during the run, every labelled frame is a held-out frame for the model before it takes it;
  the learner keeps that model's per-atom measures and force errors on it
  (``calibration.npz``) and after each update fits ``u = sqrt(b² + a² novelty)`` on all of
  them (:func:`kmlip.uncertainty.calibration_from_data`, the floor b at most the current σ_F;
  frames held out from the one-frame start model are left out). Those models were worse than
  the final one, so this errs on the safe side (95-100 % of the force-error components of an
  independent run within ±2u on the benchmark below);
* at the end of each call, the final calibration cross-validates: each of the last
  :data:`CV_FOLDS` labelled frames is predicted by a model fitted on the others without the
  sparse points taken from it (current hyperparameters and e0), and the map is fitted on those
  predictions (92-98 % within ±2u on the benchmark; a refit per fold, about 0.1 s each there).

On 108-atom fcc Cu with EMT at 1000 K (500 steps of 1 fs, 2 cores) this makes 4 reference calls
(the start structure included) and reaches a force MAE of about 13 meV/Å on frames of an
independent EMT run, in about 6 CPU seconds (``examples/learn_cu_emt.py``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols

from kmlip import labels as lab
from kmlip import uncertainty as unc
from kmlip.gp import columns

#: Bounds of the hyperparameter re-optimisation (δ eV; σ_E, σ_V eV/atom; σ_F eV/Å): positive,
#: and wide enough for any reasonable potential energy surface.
DEFAULT_BOUNDS = {"delta": (1e-2, 50.0), "sigma_energy": (1e-4, 0.05),
                  "sigma_force": (1e-2, 1.0), "sigma_stress": (1e-4, 0.05)}
#: Fewest labelled frames for a hyperparameter optimisation (one frame, e.g. a perfect crystal
#: with zero forces, drives δ to its lower bound and the gate would never trip).
MIN_FRAMES_TO_OPTIMIZE = 2
#: Relative gate threshold of a model fitted on fewer frames than that: its hyperparameters are
#: guesses and a start structure (often a perfect crystal, zero forces) says little about
#: forces, so the second reference call comes as soon as the structure has moved away from it.
FIRST_MODEL_RELATIVE_THRESHOLD = 1.5
#: Most recent labelled frames the final calibration cross-validates over (one refit each).
CV_FOLDS = 8
MANIFEST_VERSION = 1
_INFO = "kmlip_"  # prefix of the learner's entries in the reference frames' info


@dataclass
class LearningResult:
    """Outcome of :func:`learn_on_the_fly`.

    Attributes
    ----------
    model : KernelPotential
        The final model.
    calls : list of dict
        One record per reference call (``call``, ``step``, ``max_uncertainty`` eV/Å,
        ``force_mae`` and ``force_max_error`` eV/Å of the model on that frame before the update,
        ``n_sparse`` after it); the labelling of the start structure has step 0 and no errors.
    steps : int
        MD steps completed.
    stopped : str
        ``"steps"`` or ``"wall_time"``.
    directory : str or None
    cpu_seconds : float
        CPU time of this call (process time, all threads).
    """

    model: Any
    calls: list = field(default_factory=list)
    steps: int = 0
    stopped: str = "steps"
    directory: str | None = None
    cpu_seconds: float = 0.0

    @property
    def n_reference_calls(self) -> int:
        return len(self.calls)


def default_descriptor(species: Sequence):
    """SOAP over ``species`` with the learner's defaults (r_cut 4.5 Å, n_max 6, l_max 4)."""
    from kmlip.descriptors.soap import SOAP

    return SOAP(sorted(set(species), key=lambda s: lab_z(s)), r_cut=4.5, n_max=6, l_max=4)


def lab_z(s) -> int:
    from ase.data import atomic_numbers

    return int(s) if isinstance(s, (int, np.integer)) else atomic_numbers[s]


def _positive_number(v, name: str, allow_none: bool = False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number, got {v!r}")
    return float(v)


def _count(v, name: str, allow_none: bool = False, minimum: int = 0):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


# -- labelled frames ---------------------------------------------------------------------------
def label_frame(reference, atoms: Atoms) -> Atoms:
    """A copy of ``atoms`` labelled by the ASE calculator ``reference``.

    Energy, forces and, for periodic structures, the stress (skipped when the calculator does
    not provide it) are stored in a :class:`SinglePointCalculator` (extxyz keeps them).
    """
    a = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    a.calc = reference
    energy = float(a.get_potential_energy())
    forces = np.array(a.get_forces(), dtype=np.float64)
    stress = None
    if lab.is_periodic(a):
        try:
            stress = np.array(a.get_stress(voigt=True), dtype=np.float64)
        except Exception:  # noqa: BLE001 - PropertyNotImplementedError and friends
            stress = None
    out = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    if atoms.has("momenta"):
        out.set_momenta(atoms.get_momenta())
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces,
                                     **({} if stress is None else {"stress": stress}))
    if not (math.isfinite(energy) and np.all(np.isfinite(forces))):
        raise ValueError("the reference calculator returned NaN or inf")
    return out


def _roundtrip(frame: Atoms) -> Atoms:
    """The frame as ``reference.extxyz`` stores it (8 decimals): the run continues from exactly
    what a resumed run reads back, so both follow the same trajectory."""
    import io

    from ase.io import read, write

    buf = io.StringIO()
    write(buf, frame, format="extxyz")
    buf.seek(0)
    return read(buf, format="extxyz")


def _rng_hex(rng: np.random.Generator | None) -> str:
    return "" if rng is None else json.dumps(rng.bit_generator.state).encode().hex()


def _rng_from_hex(h: str, seed: int) -> np.random.Generator:
    rng = np.random.default_rng(seed)
    if h:
        rng.bit_generator.state = json.loads(bytes.fromhex(h).decode())
    return rng


def _n_labels(atoms: Atoms, hyper) -> int:
    n = 0
    if hyper.sigma_energy is not None:
        n += 1
    if hyper.sigma_force is not None:
        n += 3 * len(atoms)
    if hyper.sigma_stress is not None and lab.is_periodic(atoms):
        n += 6
    return n


# -- sparse points -----------------------------------------------------------------------------
def pick_environments(X: np.ndarray, order: Sequence[int], limit: int,
                      existing: np.ndarray | None = None, tol: float = 1e-6) -> list[int]:
    """Up to ``limit`` atoms in ``order`` whose normalised features are not near-duplicates.

    Parameters
    ----------
    X : ndarray, shape (n_atoms, F)
        Raw descriptor vectors (one species).
    order : sequence of int
        Candidate atoms, best first.
    limit : int
    existing : ndarray (m, F), optional
        Sparse points already present (candidates within ``tol`` of one are skipped too).
    tol : float
        Atoms with ``1 - x_hat . y_hat < tol`` count as duplicates.
    """
    Xh = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-300)
    chosen: list[int] = []
    ref = [] if existing is None or len(existing) == 0 else \
        list(existing / np.maximum(np.linalg.norm(existing, axis=1, keepdims=True), 1e-300))
    for i in order:
        if len(chosen) >= limit:
            break
        if ref and np.max(np.asarray(ref) @ Xh[i]) > 1.0 - tol:
            continue
        chosen.append(int(i))
        ref.append(Xh[i])
    return chosen


#: Smallest smooth-cutoff factor fc(r) of a pair taken as a sparse point (a pair near the cutoff
#: has almost no prior variance: a column of almost nothing).
MIN_PAIR_CUTOFF = 0.1


def grows_pairs(descriptor) -> bool:
    """Whether the learner grows a term's sparse points as pair distances (see
    :func:`pick_pairs`): a term whose environments are not atoms, with one feature (a distance)
    and a length scale ``theta`` (Distance2b). Other non-atom-centred terms keep the points
    of the first fit."""
    theta = getattr(descriptor, "theta", None)
    return (not getattr(descriptor, "atom_centred", True)
            and int(getattr(descriptor, "n_features", 0)) == 1
            and isinstance(theta, (int, float, np.integer, np.floating)) and theta > 0)


def pick_pairs(descriptor, env, existing: Mapping[int, np.ndarray], atom_rank: np.ndarray,
               limit: float) -> dict[int, np.ndarray]:
    """New sparse distances of a pair term: pairs of the ranked atoms, at least θ/2 from every
    point of their species pair.

    Candidates are the pair environments with an owner of finite rank, best owner first, then
    shortest first; one is taken when its smooth-cutoff factor is at least
    :data:`MIN_PAIR_CUTOFF` and it lies at least ``theta / 2`` from the key's existing and
    already taken points. The pair basis thus stays a grid of spacing >= θ/2 over the distances
    the run has visited (at most about ``2 r_cut / θ`` points per species pair), dense where
    the squared-exponential kernel of length θ needs it and no denser.

    Parameters
    ----------
    descriptor : Distance2b
        The term's descriptor (its ``theta``; its basis gives the cutoff function).
    env : Environments
        The structure's pair environments (features (n_env, 1) distances, Å).
    existing : mapping
        ``{key: (m, 1)}`` points of the term.
    atom_rank : ndarray (n_atoms,)
        Rank of each atom (lower first); ``inf`` for atoms whose pairs are not candidates.
    limit : float
        Most points to take (``inf`` for no limit).

    Returns
    -------
    dict
        ``{key: (m, 1) distances}``.
    """
    if env.n_env == 0:
        return {}
    spacing = 0.5 * float(descriptor.theta)
    r = np.asarray(env.features[:, 0], dtype=np.float64)
    fc = descriptor.make_basis({}, None).cutoff(r)[0]
    rank = np.minimum(atom_rank[env.owners[:, 0]], atom_rank[env.owners[:, 1]])
    cand = np.flatnonzero(np.isfinite(rank) & (fc >= MIN_PAIR_CUTOFF))
    cand = cand[np.lexsort((r[cand], rank[cand]))]
    taken: dict[int, list] = {}
    n = 0
    for e in cand:
        if n >= limit:
            break
        k = int(env.keys[e])
        ref = list(np.asarray(existing.get(k, np.zeros((0, 1))))[:, 0]) + taken.get(k, [])
        if ref and np.min(np.abs(np.asarray(ref) - r[e])) < spacing:
            continue
        taken.setdefault(k, []).append(float(r[e]))
        n += 1
    return {k: np.asarray(v, dtype=np.float64)[:, None] for k, v in taken.items()}


def _model_with_points(terms, term_points, delta, sigmas, e0, n_threads):
    """An unfitted model with given sparse points: ``terms`` ``[(descriptor, zeta)]``,
    ``term_points`` ``[{key name: X}]`` (one per term), δ (scalar for one term, else one per
    term), ``sigmas`` (σ_E, σ_F, σ_V), e0 (dict or None)."""
    from kmlip.model import KernelPotential

    se, sf, sv = sigmas
    if len(terms) == 1:
        (desc, zeta), points = terms[0], term_points[0]
        return KernelPotential(
            desc, zeta=zeta, delta=delta, n_sparse={k: len(v) for k, v in points.items()},
            sparse_method=points, sigma_energy=se, sigma_force=sf, sigma_stress=sv,
            **({} if e0 is None else {"e0": dict(e0)}), precision="double",
            n_threads=n_threads, progress=False)
    return KernelPotential(
        [d for d, _ in terms], zeta=[z for _, z in terms], delta=list(delta),
        n_sparse=[{k: len(v) for k, v in p.items()} for p in term_points],
        sparse_method=[dict(p) for p in term_points], sigma_energy=se, sigma_force=sf,
        sigma_stress=sv, e0=None if e0 is None else dict(e0), precision="double",
        n_threads=n_threads, progress=False)


def terms_difference(state, terms, e0=None) -> str | None:
    """How kernel terms differ from a fitted model's, or None when they are the same.

    Parameters
    ----------
    state : FittedState
        The model of a run (its checkpoint).
    terms : list of (Descriptor, zeta)
        The terms asked for (zeta None for kernels without one).
    e0 : dict, optional
        Asked-for e0 (not compared when None).

    Returns
    -------
    str or None
        The first difference in words (descriptor types, a descriptor parameter, zeta, e0); δ
        is not compared (a run re-optimises it).
    """
    run = [(t.descriptor.to_dict(), getattr(t.basis, "zeta", None)) for t in state.kernel.terms]
    asked = [(d.to_dict(), z) for d, z in terms]

    def names(sig):
        return " + ".join(d["type"] for d, _ in sig)

    if len(run) != len(asked) or any(a[0]["type"] != b[0]["type"]
                                     for a, b in zip(run, asked, strict=True)):
        return f"its terms are {names(asked)}, the run's {names(run)}"
    for t, ((d1, z1), (d2, z2)) in enumerate(zip(asked, run, strict=True)):
        if d1 != d2:
            keys = sorted(k for k in set(d1["params"]) | set(d2["params"])
                          if d1["params"].get(k) != d2["params"].get(k))
            return (f"term {t} ({d1['type']}) differs in "
                    + ", ".join(f"{k} ({d1['params'].get(k)!r} vs the run's "
                                f"{d2['params'].get(k)!r})" for k in keys))
        if z1 is not None and z2 is not None and z1 != z2:
            return f"term {t} ({d1['type']}) has zeta {z1}, the run's {z2}"
    if e0 is not None and dict(e0) != dict(state.e0):
        return f"its e0 {dict(e0)} differs from the run's {dict(state.e0)}"
    return None


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
    return f"{v:.4g}"


# -- the learner -------------------------------------------------------------------------------
class _Learner:
    """State of one learning run (see :func:`learn_on_the_fly`)."""

    def __init__(self, reference, settings: dict, directory: str | None, log: TextIO | None):
        self.reference = reference
        self.s = settings
        self.dir = directory
        self.log_stream = log
        self.model = None
        self.cache: columns.RowCache | None = None
        self.frames: list[Atoms] = []  # labelled frames in the model (training order)
        self.calls: list[dict] = []
        self.n_updates = 0
        self.bar = None  # tqdm progress bar while the MD runs
        #: per reference call: measures and force errors of the model before it took the frame
        self.held_out: dict[int, dict[str, np.ndarray]] = {}

    # -- files --------------------------------------------------------------------------------
    def path(self, name: str) -> str | None:
        return None if self.dir is None else os.path.join(self.dir, name)

    def say(self, msg: str) -> None:
        line = f"[kmlip learn] {msg}"
        if self.dir is not None:
            with open(self.path("log"), "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        if self.log_stream is not None:
            if self.bar is not None:  # keep the progress bar on its own line
                from tqdm.auto import tqdm

                tqdm.write(line, file=self.log_stream)
            else:
                print(line, file=self.log_stream, flush=True)

    def write_references(self, frames: Sequence[Atoms]) -> None:
        if self.dir is None:
            return
        from ase.io import write

        from kmlip.io import atomic_write

        atomic_write(self.path("reference.extxyz"),
                     lambda fh: write(fh, list(frames), format="extxyz"), text=True)

    def write_manifest(self, md: dict) -> None:
        if self.dir is None:
            return
        from kmlip.io import atomic_write

        data = {"format": "kmlip-learn", "version": MANIFEST_VERSION,
                "n_model_frames": len(self.frames), "n_reference_calls": len(self.calls),
                "md": md, "settings": {k: v for k, v in self.s.items()
                                       if k not in ("descriptor", "n_threads", "terms")}}
        atomic_write(self.path("manifest.json"),
                     lambda fh: json.dump(data, fh, allow_nan=True), text=True)

    def save_model(self) -> None:
        """Model file, then the row cache (both atomic; the manifest comes after them)."""
        if self.dir is None:
            return
        from kmlip.io import atomic_write

        self.model.save(self.path("model.kmlip"))
        arrays = self.cache.to_arrays()
        atomic_write(self.path("rowcache.npz"), lambda fh: np.savez(fh, **arrays))
        self.save_held_out()

    def load_cache(self) -> columns.RowCache:
        """The saved row cache if it belongs to the model and its frames, else rebuilt (a
        descriptor pass per frame; e.g. after a crash between the two files)."""
        st = self.model.fitted_state_
        p = self.path("rowcache.npz")
        if p is not None and os.path.exists(p):
            try:
                with np.load(p) as z:
                    cache = columns.RowCache.from_arrays(dict(z))
                columns.check_cache(st, cache)
                if len(cache) == len(self.frames):
                    return cache
            except (ValueError, OSError, TypeError):
                pass
        return columns.build_cache(st, self.frames, n_threads=self.s["n_threads"])

    # -- model --------------------------------------------------------------------------------
    def initial_fit(self, frames: list[Atoms]) -> None:
        s = self.s
        periodic = all(lab.is_periodic(a) for a in frames) and all(
            "stress" in (a.calc.results if a.calc is not None else {}) or "stress" in a.info
            for a in frames)
        term_points = []
        for desc, _ in s["terms"]:
            points = {}
            if getattr(desc, "atom_centred", True):
                for z in sorted({int(z) for a in frames for z in a.numbers}):
                    feats = [desc.transform(a)[a.numbers == z] for a in frames]
                    X = np.concatenate(feats)
                    idx = pick_environments(X, range(len(X)), s["initial_points"])
                    points[chemical_symbols[z]] = X[idx]
            elif grows_pairs(desc):
                # every pair of the start frames, a grid of spacing theta/2 (see pick_pairs)
                got: dict[int, np.ndarray] = {}
                for a in frames:
                    env = desc.environments(a, n_threads=s["n_threads"])
                    new = pick_pairs(desc, env, got, np.zeros(len(a)), math.inf)
                    got = {k: np.concatenate([got[k], new[k]]) if k in got and k in new
                           else got.get(k, new.get(k)) for k in {*got, *new}}
                points = {desc.key_name(k): got[k] for k in desc.kernel_keys() if k in got}
            term_points.append(points)
        self.model = _model_with_points(
            s["terms"], term_points, s["delta"],
            (s["sigma_energy"], s["sigma_force"], s["sigma_stress"] if periodic else None),
            s.get("e0"), s["n_threads"])
        if len(s["terms"]) > 1 or not getattr(s["terms"][0][0], "atom_centred", True):
            self.say("sparse points of the first model: " + "; ".join(
                f"term {t} ({type(d).__name__}): " + ", ".join(
                    f"{k} {len(v)}" for k, v in p.items())
                for t, ((d, _), p) in enumerate(zip(s["terms"], term_points, strict=True))))
        self.model.fit(frames)
        self.frames = list(frames)
        if len(frames) >= MIN_FRAMES_TO_OPTIMIZE:
            self.optimize()
        self.cache = columns.build_cache(self.model.fitted_state_, self.frames,
                                         n_threads=s["n_threads"])

    def optimize(self) -> None:
        bounds = {k: v for k, v in self.s["bounds"].items()
                  if k == "delta" or getattr(self.model, k + "_", None) is not None}
        try:
            h = self.model.optimize_hyperparameters(bounds=bounds)
        except (ValueError, np.linalg.LinAlgError) as exc:
            self.say(f"hyperparameter optimisation failed ({exc}); keeping the previous values")
            return
        self.say("hyperparameters: " + ", ".join(
            f"{k} {_fmt(v)}" for k, v in h.items()
            if v is not None and k != "log_marginal_likelihood")
            + f"; log marginal likelihood {h['log_marginal_likelihood']:.6g}")

    def novelty_threshold(self) -> float:
        """The gate's threshold as a novelty (eV²), from a threshold t on the uncalibrated
        uncertainty ``sqrt(σ_F² + novelty)``: ``t² - σ_F²``.

        t is the absolute ``threshold`` or ``relative_threshold`` times σ_F. The gate's
        decisions thus depend on the novelty and σ_F only, not on the calibration, which is
        fitted on frames earlier (worse) models had not seen and would move the threshold with
        their errors, or put it below its own error floor (a reference call every step).
        """
        s = self.s
        sf = unc.default_calibration(self.model.fitted_state_.hyper.sigma_force).floor
        t = s["threshold"]
        if t is None:
            rel = s["relative_threshold"]
            if len(self.frames) < MIN_FRAMES_TO_OPTIMIZE:
                rel = min(rel, FIRST_MODEL_RELATIVE_THRESHOLD)
            t = rel * sf
        return t * t - sf * sf

    def threshold(self) -> float:
        """Gate threshold on the (calibrated) per-atom uncertainty, eV/Å."""
        m = self.novelty_threshold()
        st = self.model.fitted_state_
        cal = st.calibration
        if cal is None or cal.measure != "novelty":
            cal = unc.default_calibration(st.hyper.sigma_force)
        return float(cal.uncertainty(np.array([max(m, 0.0)]))[0])

    def update(self, frame: Atoms, record: dict) -> None:
        """Takes one labelled frame: calibration on it, new rows, new columns, hyperparameters."""
        s = self.s
        model = self.model
        st = model.fitted_state_
        names = unc.predicted_measures()
        r = model.compute(frame, ("forces", "uncertainty", *names))
        if s["calibrate"] and not frame.info.get(_INFO + "initial") \
                and len(self.frames) >= MIN_FRAMES_TO_OPTIMIZE:
            # frames held out from the first model say little: its hyperparameters are
            # guesses and its errors there (0.2-0.3 eV/Å on Cu) are not the later models'
            self.held_out[int(record["call"])] = self.measures_before(frame, r, names)
        # atoms above half the gate threshold on the uncalibrated map (see
        # novelty_threshold): a novelty above (t / 2)² - σ_F²
        sf2 = unc.default_calibration(st.hyper.sigma_force).floor ** 2
        score = np.asarray(r.novelty)
        limit = 0.25 * (self.novelty_threshold() + sf2) - sf2
        new_points = [self.new_points(term, frame, score, limit) for term in st.kernel.terms]
        frames = self.frames + [frame]
        new_state, cache = columns.add_rows(st, self.cache, [frame], n_threads=s["n_threads"])
        new_state, cache = columns.add_columns(new_state, frames, new_points, cache,
                                               n_threads=s["n_threads"])
        model.fitted_state_ = new_state
        self.frames, self.cache = frames, cache
        self.n_updates += 1
        if s["optimize_every"] and self.n_updates % s["optimize_every"] == 0 \
                and len(frames) >= MIN_FRAMES_TO_OPTIMIZE:
            self.optimize()
        if s["calibrate"] and self.held_out:
            self.recalibrate()
        record["n_sparse"] = int(model.fitted_state_.n_sparse)
        record["n_new_points"] = int(sum(len(v) for p in new_points for v in p.values()))

    def new_points(self, term, frame: Atoms, score: np.ndarray, limit: float) -> dict:
        """One term's new sparse points from a labelled frame, ``{key name: X}``.

        An atom-centred term takes the environments of up to ``max_new_points`` atoms whose
        novelty exceeds ``limit`` (half the gate threshold), most uncertain first, skipping
        near-duplicates (at least the most uncertain atom's, so that every call adds to the
        sparse set). A pair term (:func:`grows_pairs`) takes the distances of those atoms'
        pairs that are at least θ/2 from its points (:func:`pick_pairs`): a pair basis fixed
        at the first fit would cover only the distances of the start structure (a few shells
        of a perfect crystal, no pair of a species pair it lacks), so that the two-body term
        could not follow the compressed or hot pairs the run meets. Other terms keep their
        points.
        """
        s = self.s
        desc, basis = term.descriptor, term.basis
        out = {}
        if getattr(desc, "atom_centred", True):
            X = desc.transform(frame)
            taken = 0
            for z in sorted({int(z) for z in frame.numbers}):
                idx = np.flatnonzero(frame.numbers == z)
                order = idx[np.argsort(-score[idx], kind="stable")]
                order = [i for i in order if score[i] > limit]
                existing = basis.points.get(z)
                pick = pick_environments(X, order, s["max_new_points"] - taken, existing)
                if pick:
                    out[chemical_symbols[z]] = X[pick]
                    taken += len(pick)
            if taken == 0:
                # the most uncertain atom at least, so every call adds to the sparse set
                i = int(np.argmax(score))
                pick = pick_environments(X, [i], 1, basis.points.get(int(frame.numbers[i])))
                if pick:
                    out[chemical_symbols[int(frame.numbers[i])]] = X[pick]
            return out
        if not grows_pairs(desc):
            return out
        above = np.flatnonzero(score > limit)
        if above.size == 0:
            above = np.array([int(np.argmax(score))])
        rank = np.full(len(frame), math.inf)
        rank[above[np.argsort(-score[above], kind="stable")]] = np.arange(above.size)
        env = desc.environments(frame, n_threads=s["n_threads"])
        got = pick_pairs(desc, env, basis.points, rank, s["max_new_points"])
        return {desc.key_name(k): v for k, v in got.items()}

    # -- calibration ------------------------------------------------------------------------
    def measures_before(self, frame: Atoms, r, names) -> dict[str, np.ndarray]:
        """Per-atom measures and force errors of the current model on a labelled frame it has
        not taken yet (a held-out frame: the calibration data of :meth:`recalibrate`)."""
        st = self.model.fitted_state_
        out = {"errors": np.asarray(r.forces) - np.asarray(frame.get_forces()),
               "uncertainty": np.asarray(r.uncertainty, dtype=np.float64),
               "delta2": np.array([_prior_scale(st)])}
        for k in names:
            out[k] = np.asarray(getattr(r, k), dtype=np.float64)
        return out

    def held_out_data(self):
        """Measures (dict), force errors (n, 3) and uncertainties (n,) of the frames held out
        before their update, the measures rescaled to the current δ."""
        data = [self.held_out[c] for c in sorted(self.held_out)]
        # every measure is proportional to δ² (the prior variance of a local energy), which
        # the re-optimisations change: rescale the old models' measures to the current δ so
        # that the map fitted on them applies to this model's measures
        d2 = _prior_scale(self.model.fitted_state_)
        meas = {k: np.concatenate([d[k] * (d2 / float(d["delta2"][0])) for d in data])
                for k in unc.MEASURES if all(k in d for d in data)}
        return (meas, np.concatenate([d["errors"] for d in data]),
                np.concatenate([d["uncertainty"] for d in data]))

    def recalibrate(self) -> None:
        """Fits the uncertainty map on every frame held out before its update (all reference
        calls after the first model) and stores it in the model."""
        calls = sorted(self.held_out)
        meas, errors, u = self.held_out_data()
        try:
            cal, rep = unc.calibration_from_data(
                meas, errors, "novelty", u, len(calls),
                self.model.fitted_state_.hyper.sigma_force)
        except (ValueError, np.linalg.LinAlgError) as exc:
            self.say(f"calibration failed ({exc}); keeping the previous map")
            return
        self.model.fitted_state_ = self.model.fitted_state_.replace(calibration=cal)
        self.say(f"calibration on {rep['n_atoms']} atoms of {len(calls)} frame(s) held out "
                 f"before their update: measure {rep['measure']}, u = sqrt({cal.floor:.3g}² + "
                 f"{cal.scale:.3g}² m) eV/Å; Spearman "
                 + ", ".join(f"{k} {v:.2f}" for k, v in rep["spearman"].items())
                 + f"; within ±2u {100 * rep['coverage_after']:.0f} %")

    def cross_validate(self) -> None:
        """The final calibration: each of the last :data:`CV_FOLDS` labelled frames (not the
        initial ones) is predicted by a model fitted on all the other frames, with the sparse
        points taken from that frame left out and the current hyperparameters and e0; the map
        is fitted on those predictions (floor at most σ_F) and replaces the calibration from
        frames held out before their update, whose models were worse than the final one
        (it over-covers: 99-100 % of the errors within ±2u on the Cu benchmark, 92-98 % by
        cross-validation)."""
        st = self.model.fitted_state_
        folds = [k for k, f in enumerate(self.frames)
                 if not f.info.get(_INFO + "initial")][-CV_FOLDS:]
        if not folds:
            return
        names = unc.predicted_measures()
        h = st.hyper
        terms = [(t.descriptor, t.basis.zeta) for t in st.kernel.terms]
        nt = self.s["n_threads"]
        meas: dict[str, list] = {k: [] for k in names}
        errors = []
        for k in folds:
            fr = self.frames[k]
            keep = [_points_not_from(term, fr, nt) for term in st.kernel.terms]
            try:
                fold = _model_with_points(terms, keep, h.delta, (h.sigma_energy, h.sigma_force,
                                                                 h.sigma_stress), st.e0, nt)
                fold.fit([f for j, f in enumerate(self.frames) if j != k])
                r = fold.compute(fr, ("forces", *names))
            except (ValueError, np.linalg.LinAlgError) as exc:
                self.say(f"cross-validation: frame {k} skipped ({exc})")
                continue
            errors.append(np.asarray(r.forces) - np.asarray(fr.get_forces()))
            for name in names:
                meas[name].append(np.asarray(getattr(r, name), dtype=np.float64))
        if not errors:
            return
        n_cv = len(errors)
        meas = {k: np.concatenate(v) for k, v in meas.items()}
        errors = np.concatenate(errors)
        try:
            cal, rep = unc.calibration_from_data(meas, errors, "novelty", None, n_cv,
                                                 h.sigma_force)
        except (ValueError, np.linalg.LinAlgError) as exc:
            self.say(f"cross-validated calibration failed ({exc}); keeping the previous map")
            return
        self.model.fitted_state_ = st.replace(calibration=cal)
        self.say(f"final calibration by cross-validation over {n_cv} labelled frame(s) "
                 f"({rep['n_atoms']} atoms): u = sqrt({cal.floor:.3g}² + {cal.scale:.3g}² "
                 "novelty) eV/Å; Spearman " + ", ".join(f"{k} {v:.2f}"
                                                        for k, v in rep["spearman"].items())
                 + f"; within ±2u {100 * rep['coverage_after']:.0f} %")

    def save_held_out(self) -> None:
        if self.dir is None:
            return
        from kmlip.io import atomic_write

        arrays = {f"call{c}__{k}": v for c, d in self.held_out.items() for k, v in d.items()}
        atomic_write(self.path("calibration.npz"), lambda fh: np.savez(fh, **arrays))

    def load_held_out(self) -> None:
        """The calibration data of the frames already in the model (absent entries, e.g. after
        a crash between the model file and this one, are skipped)."""
        p = self.path("calibration.npz")
        calls = {int(f.info[_INFO + "call"]) for f in self.frames
                 if not f.info.get(_INFO + "initial") and _INFO + "call" in f.info}
        self.held_out = {}
        if p is None or not os.path.exists(p):
            return
        try:
            with np.load(p) as z:
                for key in z.files:
                    c, k = key.split("__", 1)
                    c = int(c[4:])
                    if c in calls:
                        self.held_out.setdefault(c, {})[k] = np.array(z[key])
        except (ValueError, OSError, TypeError):
            self.held_out = {}


def _points_not_from(term, frame: Atoms, n_threads) -> dict:
    """A term's sparse points ``{key name: X}`` without those taken from ``frame`` (for the
    cross-validation folds)."""
    desc, basis = term.descriptor, term.basis
    keep = {}
    if getattr(desc, "atom_centred", True):
        X = desc.transform(frame, n_threads=n_threads)
        Xh = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-300)
        for z in basis.species_z:
            P = basis.points[z]
            own = Xh[frame.numbers == z]
            if len(own):
                Ph = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-300)
                # the frame's own environments are bit-identical to the points taken
                # from it; distinct points differ by >= 1e-6 (pick_environments)
                P = P[np.max(Ph @ own.T, axis=1) < 1.0 - 1e-12]
            if len(P):
                keep[chemical_symbols[z]] = P
        return keep
    env = desc.environments(frame, n_threads=n_threads)
    for k in basis.species_z:
        P = basis.points[k]
        # a pair point taken from the frame is one of its distances, bit for bit
        P = P[~np.isin(P[:, 0], env.features[env.keys == k, 0])]
        if len(P):
            keep[desc.key_name(k)] = P
    return keep


def _prior_scale(state) -> float:
    """δ² of the model (eV²), the scale of its per-atom measures; the sum of the terms' δ² for
    a sum of kernels (whose measures add the terms' prior variances)."""
    return float(np.sum(np.square(np.atleast_1d(np.asarray(state.hyper.delta, dtype=float)))))


def _md_state(atoms: Atoms, step: int, rng, traj_bytes: int) -> dict:
    return {"step": int(step), "positions": atoms.positions.tolist(),
            "momenta": atoms.get_momenta().tolist(), "cell": np.asarray(atoms.cell).tolist(),
            "pbc": [bool(p) for p in atoms.pbc], "numbers": atoms.numbers.tolist(),
            "rng": _rng_hex(rng), "traj_bytes": int(traj_bytes)}


def _md_from_frame(frame: Atoms) -> dict:
    info = frame.info
    return {"step": int(info[_INFO + "step"]), "positions": frame.positions.tolist(),
            "momenta": frame.get_momenta().tolist(), "cell": np.asarray(frame.cell).tolist(),
            "pbc": [bool(p) for p in frame.pbc], "numbers": frame.numbers.tolist(),
            "rng": str(info.get(_INFO + "rng", "")), "traj_bytes": int(info[_INFO + "traj_bytes"])}


def _record_from_frame(frame: Atoms) -> dict:
    info = frame.info
    rec = {"call": int(info[_INFO + "call"]), "step": int(info[_INFO + "step"])}
    for k in ("max_uncertainty", "force_mae", "force_max_error", "threshold"):
        v = info.get(_INFO + k)
        rec[k] = None if v is None else float(v)
    return rec


def _call_line(rec: dict) -> str:
    def f(v, unit=""):
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) \
            else f"{v:.4g}{unit}"

    return (f"reference call {rec['call']}: step {rec['step']}, max uncertainty "
            f"{f(rec.get('max_uncertainty'), ' eV/Å')}, model force error before the update: MAE "
            f"{f(rec.get('force_mae'), ' eV/Å')}, max per atom "
            f"{f(rec.get('force_max_error'), ' eV/Å')}")


def learn_on_the_fly(atoms: Atoms, reference, *, steps: int, temperature: float = 300.0,
                     timestep: float = 1.0, ensemble: str = "nvt", friction: float = 0.01,
                     frames: Sequence[Atoms] | None = None, descriptor=None, zeta: int = 4,
                     model=None,
                     threshold: float | None = None, relative_threshold: float = 3.0,
                     max_new_points: int = 32, initial_points: int = 8,
                     max_reference_calls: int | None = None, max_wall_time: float | None = None,
                     optimize_every: int = 1,
                     bounds: Mapping[str, tuple[float, float]] | None = None,
                     calibrate: bool = True, sigma_energy: float = 0.002,
                     sigma_force: float = 0.05, sigma_stress: float | None = 0.005,
                     delta: float = 0.5, directory=None, resume: bool = True,
                     trajectory_interval: int = 1, seed: int = 0, n_threads: int | None = None,
                     progress: bool | None = None, log: TextIO | None = None,
                     callback: Callable[[dict], None] | None = None) -> LearningResult:
    """Learns a potential on the fly from a reference ASE calculator (see the module docstring).

    Parameters
    ----------
    atoms : ase.Atoms
        Start structure (not modified).
    reference : ase.calculators.calculator.Calculator
        Labels frames (energy eV, forces eV/Å, stress eV/Å³ when periodic).
    steps : int
        MD steps in total (a resumed run continues up to this count).
    temperature : float
        K: the Langevin thermostat's target and the initial Maxwell-Boltzmann velocities (when
        ``atoms`` has no momenta).
    timestep : float
        fs.
    ensemble : {"nvt", "nve"}
        Langevin (``friction`` in 1/fs) or velocity Verlet.
    frames : list of ase.Atoms, optional
        Labelled frames to start from; without them the start structure is labelled by the
        reference (the first reference call, step 0).
    descriptor : Descriptor, optional
        Default :func:`default_descriptor` over the elements present.
    zeta : int
        Kernel exponent.
    model : KernelPotential, optional
        A template of the model instead of ``descriptor``, ``zeta`` and ``delta``: its
        descriptor(s), ζ, δ and e0 (when set) are used, e.g. GAP's two-body + SOAP sum
        ``KernelPotential([Distance2b(...), SOAP(...)], zeta=[None, 4], delta=[0.5, 0.2])``.
        The learner chooses every term's sparse points (the template's ``n_sparse`` and
        ``sparse_method`` are not used): an atom-centred term as described above (the
        environments of the uncertain atoms), a Distance2b term the distances of the start
        frames' pairs on a grid of spacing θ/2, grown at each reference call by the pairs of
        the uncertain atoms that are farther than θ/2 from its points (see
        :meth:`_Learner.new_points`); other terms keep the points of the first fit. The
        label noise comes from ``sigma_*`` below, not from the template. Per-atom novelty of a
        sum is the projected-process variance of the atom's energy, the sum over terms of
        each term's part (a pair's energy is shared half and half by its atoms).
    threshold : float, optional
        Absolute gate threshold t, eV/Å, on the uncalibrated uncertainty
        ``sqrt(σ_F² + novelty)``: the gate trips at a novelty of ``t² - σ_F²`` (the log states
        the equivalent calibrated uncertainty after each update). A calibration, fitted on the
        errors of earlier and worse models, does not move it.
    relative_threshold : float
        When ``threshold`` is None, t is this many times σ_F.
    max_new_points : int
        Sparse points added per reference call (atoms above half the threshold, most uncertain
        first, at least one).
    initial_points : int
        Sparse points per species of the first model (distinct environments of the start
        frames).
    max_reference_calls : int, optional
        Cap on reference calls (the labelling of the start structure counts); past it the MD
        goes on with the model.
    max_wall_time : float, optional
        Seconds of this call after which the run stops (checkpointed; resumable).
    optimize_every : int
        Re-optimise δ and the σ's (within ``bounds``) after every this many updates; 0 never.
    bounds : dict, optional
        ``{"delta" | "sigma_energy" | "sigma_force" | "sigma_stress": (low, high)}``, positive;
        default :data:`DEFAULT_BOUNDS`.
    calibrate : bool
        Calibrate the per-atom uncertainty (default): as the run goes on the frames held out
        before their update, at the end by cross-validation over the labelled frames (see the
        module docstring); stored in the model. The gate's decisions do not depend on it
        (see ``threshold``).
    sigma_energy, sigma_force, sigma_stress, delta : float
        Starting hyperparameters (eV/atom, eV/Å, eV/atom, eV); ``sigma_stress`` None ignores
        stresses.
    directory : str or os.PathLike, optional
        Run directory (created); None keeps everything in memory (no checkpoints).
    resume : bool
        Continue the run in ``directory`` when it holds one; False refuses such a directory.
        A resumed run goes on with the model of its checkpoint: a ``descriptor`` or ``model``
        given that differs from it (descriptors, ζ, e0; :func:`terms_difference`) is a
        ValueError, raised before the directory is touched; None takes the run's.
    trajectory_interval : int
        Write every this many steps to ``trajectory.extxyz``.
    seed : int
        Seed of the initial velocities and the thermostat.
    n_threads : int or None
    progress : bool or None
        tqdm bar over the steps; None shows it when stderr is a terminal.
    log : file-like, optional
        Also print the log lines there.
    callback : callable, optional
        Called with each reference call's record after its checkpoint.

    Returns
    -------
    LearningResult
    """
    t_wall0 = time.perf_counter()
    t_cpu0 = time.process_time()
    if not isinstance(atoms, Atoms) or len(atoms) == 0:
        raise TypeError("atoms must be a non-empty ase.Atoms")
    if not callable(getattr(reference, "get_potential_energy", None)) and \
            not callable(getattr(reference, "calculate", None)):
        raise TypeError(f"reference must be an ASE calculator, got {type(reference).__name__}")
    steps = _count(steps, "steps")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 K, got {temperature!r}")
    timestep = _positive_number(timestep, "timestep")
    if ensemble not in ("nvt", "nve"):
        raise ValueError(f"ensemble must be 'nvt' or 'nve', got {ensemble!r}")
    friction = _positive_number(friction, "friction")
    threshold = _positive_number(threshold, "threshold", allow_none=True)
    relative_threshold = _positive_number(relative_threshold, "relative_threshold")
    max_new_points = _count(max_new_points, "max_new_points", minimum=1)
    initial_points = _count(initial_points, "initial_points", minimum=1)
    max_reference_calls = _count(max_reference_calls, "max_reference_calls", allow_none=True,
                                 minimum=1)
    max_wall_time = _positive_number(max_wall_time, "max_wall_time", allow_none=True)
    optimize_every = _count(optimize_every, "optimize_every")
    trajectory_interval = _count(trajectory_interval, "trajectory_interval", minimum=1)
    seed = _count(seed, "seed")
    b = dict(DEFAULT_BOUNDS)
    for k, v in (bounds or {}).items():
        if k not in DEFAULT_BOUNDS:
            raise ValueError(f"bounds: unknown hyperparameter {k!r}; choose from "
                             f"{sorted(DEFAULT_BOUNDS)}")
        lo, hi = (_positive_number(x, f"bounds[{k!r}]") for x in v)
        if lo > hi:
            raise ValueError(f"bounds[{k!r}]: low {lo} > high {hi}")
        b[k] = (lo, hi)
    species = sorted({chemical_symbols[int(z)] for z in atoms.numbers}, key=lab_z)
    if frames:
        frames = lab.as_frames(frames)
        species = sorted(set(species) | {chemical_symbols[int(z)] for a in frames
                                         for z in a.numbers}, key=lab_z)
    e0 = None
    explicit = "model" if model is not None else ("descriptor" if descriptor is not None
                                                  else None)
    if model is not None:
        from kmlip.model import KernelPotential

        if not isinstance(model, KernelPotential):
            raise TypeError(f"model must be a KernelPotential (a template), got "
                            f"{type(model).__name__}")
        if descriptor is not None:
            raise ValueError("give either descriptor or model (whose descriptors are used), "
                             "not both")
        term_cfg, delta = model._terms_config()  # validated as a fit would
        terms = [(tc.descriptor, tc.zeta) for tc in term_cfg]
        e0 = None if model.e0 is None else dict(model.e0)
        delta_setting = list(delta) if isinstance(delta, tuple) else delta
        zeta_setting = [z for _, z in terms] if len(terms) > 1 else terms[0][1]
        descriptor = [d for d, _ in terms] if len(terms) > 1 else terms[0][0]
    else:
        if descriptor is None:
            descriptor = default_descriptor(species)
        terms = [(descriptor, _count(zeta, "zeta", minimum=1))]
        delta_setting = _positive_number(delta, "delta")
        zeta_setting = terms[0][1]
    for t, (d, _) in enumerate(terms):
        missing = [s for s in species if lab_z(s) not in d.species_z]
        if missing:
            raise ValueError(f"the descriptor{f' of term {t}' if len(terms) > 1 else ''} does "
                             f"not cover species {missing}")
    settings = {"steps": steps, "temperature": temperature, "timestep_fs": timestep,
                "ensemble": ensemble, "friction_per_fs": friction, "threshold": threshold,
                "relative_threshold": relative_threshold, "max_new_points": max_new_points,
                "initial_points": initial_points, "max_reference_calls": max_reference_calls,
                "optimize_every": optimize_every, "bounds": b, "calibrate": bool(calibrate),
                "sigma_energy": _positive_number(sigma_energy, "sigma_energy"),
                "sigma_force": _positive_number(sigma_force, "sigma_force"),
                "sigma_stress": _positive_number(sigma_stress, "sigma_stress", allow_none=True),
                "delta": delta_setting, "zeta": zeta_setting, "e0": e0,
                "seed": seed, "trajectory_interval": trajectory_interval}
    directory = None if directory is None else os.fspath(directory)
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    run = _Learner(reference, settings, directory, log)
    manifest = None
    refs: list[Atoms] = []
    if directory is not None:
        mpath = run.path("manifest.json")
        rpath = run.path("reference.extxyz")
        has_run = os.path.exists(mpath) or os.path.exists(rpath)
        if has_run and not resume:
            raise ValueError(f"{directory}: holds a learning run; resume it or choose another "
                             "directory")
        if os.path.exists(mpath):
            try:
                with open(mpath, encoding="utf-8") as fh:
                    manifest = json.load(fh)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{mpath}: unreadable run manifest ({exc})") from None
            if manifest.get("format") != "kmlip-learn":
                raise ValueError(f"{mpath}: not a kmlip learning run")
            if explicit and os.path.exists(run.path("model.kmlip")):
                from kmlip.model import load

                why = terms_difference(load(run.path("model.kmlip")).fitted_state_, terms, e0)
                if why is not None:
                    # the run goes on with its own model: another one asked for would be
                    # ignored without a word (checked before the run's log is touched)
                    raise ValueError(f"{directory} resumes from its own model, but the given "
                                     f"{explicit} differs: {why}; give the run's, none, or "
                                     "another directory")
        if os.path.exists(rpath):
            from ase.io import read

            try:
                refs = read(rpath, index=":", format="extxyz")
            except Exception as exc:  # noqa: BLE001 - any parse failure of an untrusted file
                raise ValueError(f"{rpath}: unreadable reference frames ({exc})") from None
    settings["descriptor"] = descriptor
    settings["terms"] = terms
    settings["n_threads"] = n_threads

    def _info(d):
        return d.to_dict() if hasattr(d, "to_dict") else repr(d)

    desc_info = [_info(d) for d, _ in terms] if len(terms) > 1 else _info(terms[0][0])
    write_manifest = run.write_manifest

    resuming = bool(refs) or manifest is not None
    rng = np.random.default_rng(seed)
    state_atoms = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell,
                        pbc=atoms.pbc)
    if atoms.has("momenta") and np.any(atoms.get_momenta() != 0):
        state_atoms.set_momenta(atoms.get_momenta())
    elif temperature > 0:
        from ase.md import velocitydistribution as vd

        # thermalize_momenta is ASE >= 3.29's name of MaxwellBoltzmannDistribution
        thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution
        thermalize(state_atoms, temperature_K=temperature, rng=rng)
        vd.Stationary(state_atoms)
    md = _md_state(state_atoms, 0, rng, 0)

    if not resuming:
        run.say(f"start: {len(atoms)} atoms ({', '.join(species)}), {steps} steps of "
                f"{timestep:g} fs, {ensemble.upper()} at {temperature:g} K"
                + (f" (Langevin friction {friction:g}/fs)" if ensemble == "nvt" else ""))
        run.say(f"descriptor: {desc_info}; zeta {settings['zeta']}"
                + ("" if model is None else f"; delta {settings['delta']}"
                   + ("" if e0 is None else f"; e0 {e0}")))
        if any(not getattr(d, "atom_centred", True) for d, _ in terms):
            run.say("sparse points of the terms whose environments are not atoms: "
                    + "; ".join(f"term {t} ({type(d).__name__}) "
                                + ("distances of the start frames' pairs, grown by the pairs "
                                   "of uncertain atoms (spacing >= theta/2)" if grows_pairs(d)
                                   else "fixed at the first fit")
                                for t, (d, _) in enumerate(terms)
                                if not getattr(d, "atom_centred", True)))
        run.say("gate: " + (f"absolute threshold {threshold:g} eV/Å" if threshold is not None
                            else f"{relative_threshold:g} × σ_F ("
                                 f"{min(relative_threshold, FIRST_MODEL_RELATIVE_THRESHOLD):g} × "
                                 "while the model holds one frame)")
                + " on the uncalibrated uncertainty sqrt(σ_F² + novelty), i.e. at a novelty "
                "of t² - σ_F²; stated after each update in eV/Å of the calibrated uncertainty"
                + (" (calibrated on every frame before the model takes it)"
                   if calibrate else "")
                + f"; up to {max_new_points} new sparse points per call (atoms above half the "
                "threshold); hyperparameters re-optimised "
                + (f"every {optimize_every} update(s)" if optimize_every else "never")
                + f" within {b}; reference-call cap {max_reference_calls}, wall-time cap "
                + (f"{max_wall_time:g} s" if max_wall_time else "none"))
        init = []
        for a in frames or []:
            a = _roundtrip(a)  # a copy with its labels (Atoms.copy drops the calculator)
            a.info[_INFO + "initial"] = True
            a.info[_INFO + "source"] = "given"
            init.append(a)
        if not init:
            first = label_frame(reference, state_atoms)
            first.info.update({_INFO + "initial": True, _INFO + "source": "reference",
                               _INFO + "call": 1, _INFO + "step": 0,
                               _INFO + "rng": _rng_hex(rng), _INFO + "traj_bytes": 0})
            init.append(_roundtrip(first))
            run.write_references(init)
            rec = _record_from_frame(first)
            run.calls.append(rec)
            run.say(_call_line(rec) + " (the start structure)")
        else:
            run.write_references(init)
        refs = init
    else:
        run.say(f"resuming the run in {directory}")

    # -- the model: from the checkpoint, or fitted on the initial frames ---------------------
    calls_in_refs = [r for r in refs if r.info.get(_INFO + "source") == "reference"]
    run.calls = [_record_from_frame(r) for r in calls_in_refs]
    model_path = run.path("model.kmlip")
    if manifest is not None and model_path is not None and os.path.exists(model_path):
        from kmlip.model import load

        run.model = load(model_path)
        run.model.set_params(n_threads=n_threads)
        st = run.model.fitted_state_
        total = sum(st.n_labels.values())
        k, acc = 0, 0
        while k < len(refs) and acc < total:
            acc += _n_labels(refs[k], st.hyper)
            k += 1
        if acc != total:
            raise ValueError(f"{directory}: model.kmlip does not match reference.extxyz "
                             f"({total} labels in the model)")
        run.frames = list(refs[:k])
        run.cache = run.load_cache()
        run.load_held_out()
        run.n_updates = sum(1 for r in run.frames if not r.info.get(_INFO + "initial"))
        md = manifest["md"]
    else:
        init = [r for r in refs if r.info.get(_INFO + "initial")]
        if not init:
            raise ValueError(f"{directory}: reference.extxyz has no initial frames")
        run.initial_fit(init)
        run.save_model()
        write_manifest(md)
    pending = refs[len(run.frames):]
    if resuming:
        # log lines lost in a crash (the log is appended after the reference frame is written)
        logged = set()
        if run.path("log") and os.path.exists(run.path("log")):
            with open(run.path("log"), encoding="utf-8") as fh:
                for line in fh:
                    if "reference call " in line:
                        try:
                            logged.add(int(line.split("reference call ")[1].split(":")[0]))
                        except (IndexError, ValueError):
                            pass
        for rec in run.calls:
            if rec["call"] not in logged:
                run.say(_call_line(rec) + " (logged on resume)")
    for fr in pending:
        rec = _record_from_frame(fr)
        run.update(fr, rec)
        run.save_model()
        run.say(f"call {rec['call']} taken on resume; {rec['n_sparse']} sparse points")
        if _md_from_frame(fr)["step"] >= md["step"]:
            md = _md_from_frame(fr)
        write_manifest(md)

    # -- MD ----------------------------------------------------------------------------------
    traj_path = run.path("trajectory.extxyz")
    if traj_path is not None:
        if os.path.exists(traj_path) and os.path.getsize(traj_path) > md["traj_bytes"]:
            with open(traj_path, "r+b") as fh:
                fh.truncate(md["traj_bytes"])
        elif not os.path.exists(traj_path):
            open(traj_path, "wb").close()
    cur = Atoms(md["numbers"], positions=md["positions"], cell=md["cell"], pbc=md["pbc"])
    cur.set_momenta(np.asarray(md["momenta"]))
    rng = _rng_from_hex(md["rng"], seed)
    step = int(md["step"])
    from kmlip.active.gate import UncertaintyGate
    from kmlip.calculator import KMLIPCalculator

    def new_dynamics():
        cur.calc = KMLIPCalculator(run.model, variances=("uncertainty",))
        if ensemble == "nve":
            from ase.md.verlet import VelocityVerlet

            dyn = VelocityVerlet(cur, timestep * units.fs)
        else:
            from ase.md.langevin import Langevin

            dyn = Langevin(cur, timestep * units.fs, temperature_K=temperature,
                           friction=friction / units.fs, fixcm=False, rng=rng)
        learning = max_reference_calls is None or len(run.calls) < max_reference_calls
        gate = UncertaintyGate(cur, threshold=run.threshold(), log=None,
                               raise_on_trip=False) if learning else None
        return dyn, gate

    def write_traj(u):
        if traj_path is None:
            return
        from ase.io import write

        a = Atoms(cur.numbers, positions=cur.positions, cell=cur.cell, pbc=cur.pbc)
        a.arrays["uncertainty"] = np.asarray(u, dtype=np.float64).copy()
        a.info["step"] = step
        a.calc = SinglePointCalculator(a, energy=cur.calc.results["energy"],
                                       forces=cur.calc.results["forces"])
        with open(traj_path, "a", encoding="utf-8") as fh:
            write(fh, a, format="extxyz")

    show = progress if progress is not None else bool(getattr(sys.stderr, "isatty",
                                                              lambda: False)())
    bar = None
    if show and step < steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=step, desc="kmlip learn", unit="step", leave=False)
        run.bar = bar
    stopped = "steps"
    cap_said = False
    try:
        dyn, gate = new_dynamics()
        if step == 0 and traj_path is not None and os.path.getsize(traj_path) == 0:
            cur.get_forces()
            write_traj(cur.calc.get_property("uncertainty", cur))
        while step < steps:
            if max_wall_time is not None and time.perf_counter() - t_wall0 > max_wall_time:
                stopped = "wall_time"
                break
            dyn.step()
            step += 1
            u = cur.calc.get_property("uncertainty", cur)
            if step % trajectory_interval == 0:
                write_traj(u)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(calls=len(run.calls), max_u=f"{float(np.max(u)):.3f}")
            if gate is None:
                continue
            gate()
            if gate.tripped is None:
                continue
            # -- a reference call: label, persist, then update the model ----------------------
            model_f = np.array(cur.calc.results["forces"])
            trip_threshold = gate.threshold
            frame = label_frame(reference, cur)
            err = model_f - frame.calc.results["forces"]
            traj_bytes = os.path.getsize(traj_path) if traj_path is not None else 0
            rec = {"call": len(run.calls) + 1, "step": step,
                   "max_uncertainty": float(np.max(u)),
                   "force_mae": float(np.mean(np.abs(err))),
                   "force_max_error": float(np.max(np.linalg.norm(err, axis=1))),
                   "threshold": float(trip_threshold)}
            frame.info.update({_INFO + "source": "reference", _INFO + "call": rec["call"],
                               _INFO + "step": step, _INFO + "rng": _rng_hex(rng),
                               _INFO + "traj_bytes": traj_bytes,
                               _INFO + "max_uncertainty": rec["max_uncertainty"],
                               _INFO + "force_mae": rec["force_mae"],
                               _INFO + "force_max_error": rec["force_max_error"],
                               _INFO + "threshold": rec["threshold"]})
            frame.arrays[_INFO + "uncertainty"] = np.asarray(u, dtype=np.float64).copy()
            frame = _roundtrip(frame)
            refs = refs + [frame]
            run.write_references(refs)
            run.calls.append(rec)
            run.say(_call_line(rec))
            run.update(frame, rec)
            run.save_model()
            write_manifest(_md_from_frame(frame))
            run.say(f"updated: {rec['n_sparse']} sparse points (+{rec['n_new_points']}), next "
                    f"gate threshold {run.threshold():.4g} eV/Å")
            if callback is not None:
                callback(dict(rec))
            if max_reference_calls is not None and len(run.calls) >= max_reference_calls \
                    and not cap_said:
                run.say(f"reference-call cap {max_reference_calls} reached; the MD goes on "
                        "with the model")
                cap_said = True
            cur.positions = frame.positions
            cur.set_momenta(frame.get_momenta())
            dyn, gate = new_dynamics()
    finally:
        if bar is not None:
            bar.close()
            run.bar = None
    if calibrate:
        run.cross_validate()
    run.save_model()
    traj_bytes = os.path.getsize(traj_path) if traj_path is not None else 0
    write_manifest(_md_state(cur, step, rng, traj_bytes))
    cpu = time.process_time() - t_cpu0
    run.say(f"stopped ({'wall-time cap' if stopped == 'wall_time' else 'all steps done'}) at "
            f"step {step}: {len(run.calls)} reference calls, "
            f"{run.model.fitted_state_.n_sparse} sparse points, CPU {cpu:.1f} s")
    return LearningResult(model=run.model, calls=list(run.calls), steps=step, stopped=stopped,
                          directory=directory, cpu_seconds=cpu)


__all__ = ["DEFAULT_BOUNDS", "LearningResult", "default_descriptor", "grows_pairs", "label_frame",
           "learn_on_the_fly", "pick_environments", "pick_pairs"]
