"""The C headers of ``kmlip/_ext`` are ready for C and C++ callers.

Every header compiles on its own and together with the others, as C99 and as C++17, with and
without OpenMP, warnings as errors; names follow one scheme (``kmlip_`` functions, types and
struct tags, ``KMLIP_`` macros), sizes and indices are ``int64_t`` only, and each header has the
``extern "C"`` guard. A small C++ program that includes the headers computes SOAP features,
gradients and forces that agree with the Python extension.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

EXT = Path(__file__).resolve().parent.parent / "kmlip" / "_ext"
HEADERS = sorted(EXT.glob("*.h"))
WARNINGS = ["-Wall", "-Wextra", "-pedantic", "-Werror"]
STD = {"c": ["-x", "c", "-std=c99"], "c++": ["-x", "c++", "-std=c++17"]}
# Integer types other than int64_t (size_t only as the cast of a byte count for memset/memcpy).
OTHER_INTS = re.compile(r"\b(?:int|long|short|unsigned|signed|ptrdiff_t|ssize_t|intptr_t|"
                        r"u?int(?:8|16|32)_t|"
                        r"uintptr_t|Py_ssize_t|npy_intp|intp)\b|\bsize_t\b(?!\s*\))")
GUARD_OPEN = re.compile(r'#\s*ifdef\s+__cplusplus\s*\n\s*extern\s+"C"\s*\{\s*\n\s*#\s*endif')
GUARD_CLOSE = re.compile(r"#\s*ifdef\s+__cplusplus\s*\n\s*\}\s*\n\s*#\s*endif")


def _compiler(lang: str) -> str | None:
    names = ("cc", "gcc", "clang") if lang == "c" else ("c++", "g++", "clang++")
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group().count("\n"), text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _drop_attributes(code: str) -> str:
    """Removes ``__attribute__((...))`` (balanced parentheses)."""
    while (k := code.find("__attribute__")) >= 0:
        depth, j = 0, code.index("(", k)
        while True:
            depth += {"(": 1, ")": -1}.get(code[j], 0)
            j += 1
            if depth == 0:
                break
        code = code[:k] + code[j:]
    return code


def _file_scope(code: str) -> str:
    """Code outside braces, with every braced block replaced by ``{}`` (preprocessor lines, the
    extern "C" guard and attributes removed first)."""
    code = GUARD_OPEN.sub("", GUARD_CLOSE.sub("", code))
    code = re.sub(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", "", code, flags=re.M)
    code = _drop_attributes(code)
    out, depth = [], 0
    for ch in code:
        if ch == "{":
            if depth == 0:
                out.append("{}")
            depth += 1
        elif ch == "}":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def declared_names(text: str) -> dict[str, list[str]]:
    """Functions, typedefs, struct tags, file-scope variables and macros a header declares."""
    code = _strip_comments(text)
    names: dict[str, list[str]] = {"function": [], "typedef": [], "tag": [], "variable": [],
                                   "macro": re.findall(r"^[ \t]*#\s*define\s+(\w+)", code, re.M)}
    # statements end at ';' or at a function body ("...) {}")
    for stmt in re.split(r";|(?<=\))\s*\{\}", _file_scope(code)):
        stmt = " ".join(stmt.split())
        if not stmt:
            continue
        names["tag"] += re.findall(r"\b(?:struct|union|enum)\s+([A-Za-z_]\w*)", stmt)
        if stmt.startswith("typedef"):
            pointer = re.search(r"\(\s*\*\s*([A-Za-z_]\w*)\s*\)", stmt)
            names["typedef"].append(pointer.group(1) if pointer
                                    else re.findall(r"[A-Za-z_]\w*", stmt)[-1])
            continue
        call = [n for n in re.findall(r"\b([A-Za-z_]\w*)\s*\(", stmt) if not n.startswith("__")]
        if call:
            names["function"].append(call[0])
        elif not re.fullmatch(r"(?:struct|union|enum)\s+\w+", stmt):
            names["variable"].append(re.findall(r"[A-Za-z_]\w*", stmt.split("=")[0])[-1])
    return names


def convention_problems(text: str) -> list[str]:
    """What in a header's text breaks the naming, integer-type and extern "C" conventions."""
    problems = []
    names = declared_names(text)
    for kind in ("function", "typedef", "tag", "variable"):
        problems += [f"{kind} {n} lacks the kmlip_ prefix" for n in names[kind]
                     if not n.startswith("kmlip_")]
    problems += [f"macro {n} lacks the KMLIP_ prefix" for n in names["macro"]
                 if not n.startswith("KMLIP_")]
    code = _strip_comments(text)
    bare = re.sub(r'"(?:\\.|[^"\\])*"', '""', code)   # string literals say nothing of types
    for m in OTHER_INTS.finditer(bare):
        line = bare.count("\n", 0, m.start()) + 1
        problems.append(f"line {line}: integer type {m.group()!r} (sizes and indices are int64_t)")
    if not GUARD_OPEN.search(code) or not GUARD_CLOSE.search(code):
        problems.append('no #ifdef __cplusplus extern "C" { ... } guard')
    return problems


def test_all_core_headers_are_checked():
    names = {h.name for h in HEADERS}
    assert {"soap_core.h", "contract_core.h", "ewald_core.h", "kmlip_omp.h"} <= names


@pytest.mark.parametrize("header", HEADERS, ids=[h.name for h in HEADERS])
def test_header_conventions(header):
    text = header.read_text()
    assert convention_problems(text) == []
    assert declared_names(text)["function"], "the parser found no function"


def test_convention_checker_flags_violations():
    bad = """
#ifndef SOAP_H
#define SOAP_H
#include <stdint.h>
#define restrict __restrict
typedef struct soap_tag { int n_max; } soap_params;
typedef void (*soap_fn)(void);
static inline long soap_lm_size(const soap_params *p) { return p->n_max; }
static double table[3] = {1.0, 2.0, 3.0};
static inline void kmlip_ok(int64_t n, double *x) { memset(x, 0, sizeof(double) * (size_t)n); }
#endif
"""
    problems = convention_problems(bad)
    for expected in ("function soap_lm_size", "typedef soap_params", "typedef soap_fn",
                     "tag soap_tag", "variable table", "macro SOAP_H", "macro restrict",
                     "'int'", "'long'", "extern \"C\""):
        assert any(expected in p for p in problems), (expected, problems)
    assert not any("kmlip_ok" in p for p in problems)
    assert sum("integer type" in p for p in problems) == 2


def _translation_unit(headers: list[Path]) -> str:
    """Includes the headers (twice: the include guards) and takes the address of each of their
    functions, so that every static inline body is compiled, not only parsed."""
    lines = [f'#include "{h.name}"' for h in headers] * 2
    funcs = [f for h in headers for f in declared_names(h.read_text())["function"]]
    lines.append("typedef void (*kmlip_test_fn_)(void);")
    lines.append("kmlip_test_fn_ kmlip_test_fns_[] = {")
    lines += [f"    (kmlip_test_fn_)&{f}," for f in funcs]
    lines.append("};")
    return "\n".join(lines) + "\n"


def _has_openmp(cc: str, lang: str, tmp_path: Path) -> bool:
    src = tmp_path / f"omp_probe_{lang.replace('+', 'p')}"
    src.write_text("#include <omp.h>\nint kmlip_probe(void) { return omp_get_max_threads(); }\n")
    cmd = [cc, *STD[lang], "-fopenmp", "-fsyntax-only", str(src)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.mark.parametrize("lang", ["c", "c++"])
def test_headers_compile(lang, tmp_path):
    cc = _compiler(lang)
    if cc is None:
        pytest.skip(f"no {lang} compiler on this machine")
    units = {h.name: [h] for h in HEADERS}
    units["all headers"] = HEADERS
    variants = [[]] + ([["-fopenmp"]] if _has_openmp(cc, lang, tmp_path) else [])
    jobs = []
    for k, (label, headers) in enumerate(units.items()):
        src = tmp_path / f"tu{k}.txt"
        src.write_text(_translation_unit(headers))
        for flags in variants:
            # each header alone: parsed and type-checked; all together: also optimised (the
            # warnings that need data-flow analysis), which takes longer
            mode = (["-O1", "-c", "-o", str(tmp_path / f"tu{k}{''.join(flags)}.o")]
                    if label == "all headers" else ["-fsyntax-only"])
            cmd = [cc, *STD[lang], *WARNINGS, *flags, f"-I{EXT}", *mode, str(src)]
            jobs.append((f"{label} {' '.join(flags)}", subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failures = []
    for label, proc in jobs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"--- {label} ({lang}):\n{out}")
    assert not failures, "\n".join(failures)


CXX_CALLER = r"""
#include "soap_core.h"
#include "contract_core.h"
#include "kmlip_omp.h"
#include <cstdio>
#include <vector>

template <class T> static std::vector<T> take(std::FILE *f, int64_t n)
{
    std::vector<T> v(static_cast<size_t>(n));
    if (n > 0 && std::fread(v.data(), sizeof(T), v.size(), f) != v.size()) throw 1;
    return v;
}

int main(int, char **argv)
{
    std::FILE *f = std::fopen(argv[1], "rb");
    const std::vector<int64_t> h = take<int64_t>(f, 6);
    const std::vector<double> d = take<double>(f, 3);
    const int64_t N = h[0], L1 = h[1] + 1, R = h[2] * N, F = h[3], n_atoms = h[4], n_pairs = h[5];
    const std::vector<double> A = take<double>(f, L1 * N), B = take<double>(f, L1 * N * N);
    const std::vector<int64_t> fi = take<int64_t>(f, L1 * R * R);
    const std::vector<double> fs = take<double>(f, L1 * R * R), yn = take<double>(f, L1 * L1);
    const std::vector<int64_t> cs = take<int64_t>(f, n_atoms);
    const std::vector<int64_t> off = take<int64_t>(f, n_atoms + 1);
    const std::vector<double> vec = take<double>(f, 3 * n_pairs);
    const std::vector<int64_t> ps = take<int64_t>(f, n_pairs);
    const std::vector<double> V = take<double>(f, n_atoms * F);
    std::fclose(f);

    kmlip_soap_params p;
    p.n_max = N; p.l_max = h[1]; p.n_species = h[2]; p.n_features = F;
    p.r_cut = d[0]; p.cutoff_width = d[1]; p.center_weight = d[2];
    p.A = A.data(); p.B = B.data(); p.feat_index = fi.data(); p.feat_scale = fs.data();
    p.ylm_norm = yn.data();
    int64_t max_neigh = 0;
    for (int64_t i = 0; i < n_atoms; i++)
        if (off[i + 1] - off[i] > max_neigh) max_neigh = off[i + 1] - off[i];
    std::vector<double> work(static_cast<size_t>(kmlip_soap_work_size(&p, max_neigh)));
    std::vector<double> X(n_atoms * F), G((n_atoms + n_pairs) * 3 * F, 0.0), fp(3 * n_pairs);
    for (int64_t i = 0; i < n_atoms; i++) {
        const int64_t s = off[i], n = off[i + 1] - s;
        kmlip_soap_centre(&p, cs[i], n, vec.data() + 3 * s, ps.data() + s, work.data(),
                          X.data() + i * F, G.data() + (s + i) * 3 * F);
        kmlip_soap_centre_vjp(&p, cs[i], n, vec.data() + 3 * s, ps.data() + s,
                              V.data() + i * F, 0, work.data(), fp.data() + 3 * s);
    }
    std::FILE *o = std::fopen(argv[2], "wb");
    std::fwrite(X.data(), sizeof(double), X.size(), o);
    std::fwrite(G.data(), sizeof(double), G.size(), o);
    std::fwrite(fp.data(), sizeof(double), fp.size(), o);
    std::fclose(o);
    return kmlip_omp_get_max_threads() >= 1 ? 0 : 1;
}
"""


def _soap_case(rng):
    """Small random SOAP tables and neighbour lists in the layout of ``kmlip._ext.soap``."""
    n_max, l_max, n_species, r_cut = 3, 3, 2, 3.0
    L1, R = l_max + 1, n_species * n_max
    A = -(0.5 + rng.random((L1, n_max)))
    B = rng.normal(size=(L1, n_max, n_max))
    index = np.full((L1, R, R), -1, dtype=np.int64)
    scale = np.zeros((L1, R, R))
    f = 0
    for a in range(n_species):
        for b in range(a, n_species):
            for l in range(L1):
                for n in range(n_max):
                    for n2 in range(n if a == b else 0, n_max):
                        r1, r2 = a * n_max + n, b * n_max + n2
                        index[l, r1, r2], scale[l, r1, r2] = f, 1.0 if r1 == r2 else 2**0.5
                        f += 1
    norm = 0.2 + rng.random(L1 * L1)
    counts = rng.integers(0, 7, size=6)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n_pairs = int(offsets[-1])
    u = rng.normal(size=(n_pairs, 3))
    vectors = u / np.linalg.norm(u, axis=1)[:, None] * rng.uniform(0.8, r_cut, (n_pairs, 1))
    return dict(A=A, B=B, index=index, scale=scale, norm=norm, n_max=n_max, l_max=l_max,
                n_species=n_species, F=f, r_cut=r_cut, width=0.5, cw=1.0,
                centre=rng.integers(0, n_species, 6).astype(np.int64), offsets=offsets,
                vectors=np.ascontiguousarray(vectors),
                pair_species=rng.integers(0, n_species, n_pairs).astype(np.int64))


def test_cxx_caller_matches_extension(tmp_path):
    cxx = _compiler("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    from kmlip._ext import soap as _soap

    c = _soap_case(np.random.default_rng(7))
    n_atoms, n_pairs, F = len(c["centre"]), len(c["pair_species"]), c["F"]
    V = np.random.default_rng(8).normal(size=(n_atoms, F))
    with open(tmp_path / "in.bin", "wb") as fh:
        np.array([c["n_max"], c["l_max"], c["n_species"], F, n_atoms, n_pairs],
                 dtype=np.int64).tofile(fh)
        np.array([c["r_cut"], c["width"], c["cw"]]).tofile(fh)
        for key in ("A", "B", "index", "scale", "norm", "centre", "offsets", "vectors",
                    "pair_species"):
            c[key].tofile(fh)
        V.tofile(fh)
    (tmp_path / "caller.cpp").write_text(CXX_CALLER)
    exe = tmp_path / "caller"
    subprocess.run([cxx, "-std=c++17", *WARNINGS, "-O1", f"-I{EXT}", str(tmp_path / "caller.cpp"),
                    "-o", str(exe), "-lm"], check=True, capture_output=True)
    subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    out = np.fromfile(tmp_path / "out.bin")
    X_cxx = out[:n_atoms * F].reshape(n_atoms, F)
    G_cxx = out[n_atoms * F:-3 * n_pairs].reshape(n_atoms + n_pairs, 3, F)
    f_cxx = out[-3 * n_pairs:].reshape(n_pairs, 3)

    args = (c["A"], c["B"], c["index"], c["scale"], c["norm"], c["n_max"], c["l_max"],
            c["n_species"], F, c["r_cut"], c["width"], c["cw"], False, c["centre"],
            c["offsets"], c["vectors"], c["pair_species"])
    X, fpair = np.empty((n_atoms, F)), np.zeros((n_pairs, 3))
    G = np.zeros((n_atoms + n_pairs, 3, F))
    _soap.compute(*args, X, G, 1)
    _soap.vjp(*args, V, fpair, 1)
    assert np.abs(X).max() > 0 and np.abs(fpair).max() > 0
    # same operations in the same order; only FMA contraction (targets that have it) may differ
    np.testing.assert_allclose(X_cxx, X, rtol=1e-12, atol=1e-12 * np.abs(X).max())
    np.testing.assert_allclose(G_cxx, G, rtol=1e-12, atol=1e-12 * np.abs(G).max())
    np.testing.assert_allclose(f_cxx, fpair, rtol=1e-12, atol=1e-12 * np.abs(fpair).max())
