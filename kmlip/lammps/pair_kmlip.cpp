/* LAMMPS pair style "kmlip" (see pair_kmlip.h and the README section "LAMMPS").
 *
 * Energy of local atom i (species z, features p_i of its neighbours within the SOAP cutoff):
 *     E_i = e0[z] + delta^2 sum_m alpha_m (p_hat_i . s_hat_m)^zeta      (sparse points of z)
 * The SOAP steps are kmlip's (kmlip/_ext/soap_core.h); the kernel against the sparse points
 * runs per block of centres as two tiled products: contract_core.h's kmlip_centre_energy_grad
 * does the same arithmetic per centre, reading every sparse point once per atom through a
 * scalar reduction; per block they are read once per 32 atoms and the products vectorise.
 * Forces: the kernel gives v = dE_i/dp_i; the SOAP vector-Jacobian product turns v into
 * g_ij = dE_i/dr_ij for every pair, and f_i += g_ij, f_j -= g_ij (j may be a ghost: newton_pair
 * on, LAMMPS sums ghost forces into their owners). Virial: -sum g_ij (x) r_ij, i.e. LAMMPS's
 * pairwise tally of (x_i - x_j) (x) f_i, so per-atom virials split each pair term in halves.
 */
#include "pair_kmlip.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "json.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "utils.h"

#include <cmath>
#include <algorithm>
#include <cstring>
#include <exception>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>

#include <mpi.h>
#include <unistd.h>

using namespace LAMMPS_NS;

// The hot functions are compiled for several x86-64 levels and picked at load time (GCC's
// target_clones, an ifunc): the plugin is built on a login node and may run on other CPUs, so
// -march=native is no default, yet AVX2/AVX-512 with FMA double the speed of the kernel's
// products and of kmlip's SOAP steps (inlined into each clone).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(KMLIP_NO_CLONES)
#define KMLIP_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KMLIP_CLONES
#endif

namespace {

const char *const ELEMENTS[] = {
    "X", "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S",
    "Cl", "Ar", "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge",
    "As", "Se", "Br", "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd",
    "In", "Sn", "Sb", "Te", "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd",
    "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg",
    "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa", "U", "Np", "Pu", "Am", "Cm",
    "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn",
    "Nh", "Fl", "Mc", "Lv", "Ts", "Og"};
constexpr int N_Z = 119;
const char MAGIC[] = "KMLIP-LAMMPS\n";
constexpr int FORMAT_VERSION = 1;

int symbol_to_z(const std::string &s)
{
  for (int z = 1; z < N_Z; ++z)
    if (s == ELEMENTS[z]) return z;
  return 0;
}

// Little-endian arrays of the export; the file's "arrays" entry gives dtype, shape, offset.
template <typename T>
std::vector<T> take_array(const json &entries, const std::string &name, const char *dtype,
                          const std::vector<char> &blob, size_t data_start,
                          const std::vector<int64_t> &shape)
{
  if (!entries.contains(name)) throw std::runtime_error("missing array '" + name + "'");
  const json &e = entries.at(name);
  if (e.at("dtype").get<std::string>() != dtype)
    throw std::runtime_error("array '" + name + "' has dtype " + e.at("dtype").get<std::string>()
                             + ", expected " + dtype);
  const auto got = e.at("shape").get<std::vector<int64_t>>();
  if (!shape.empty() && got != shape) throw std::runtime_error("array '" + name + "' has the wrong shape");
  int64_t count = 1;
  for (auto s : got) count *= s;
  const int64_t offset = e.at("offset").get<int64_t>();
  const int64_t nbytes = e.at("nbytes").get<int64_t>();
  if (nbytes != count * (int64_t) sizeof(T) || offset < 0
      || data_start + (size_t) offset + (size_t) nbytes > blob.size())
    throw std::runtime_error("array '" + name + "' lies outside the file (truncated?)");
  std::vector<T> out((size_t) count);
  if (count) std::memcpy(out.data(), blob.data() + data_start + offset, (size_t) nbytes);
  return out;
}

// C (nb, ldc) = A (nb, lda) . B (K, ldb) over the first n columns of B, for nb <= 4 * rows of
// A and n a multiple of 8: 4 x 8 tiles of C in registers, one pass over B per tile row. The
// callers pad A (zero rows), B and C (zero columns) to those multiples.
typedef double kmlip_v4d __attribute__((vector_size(32)));

// always inlined: each target clone then keeps the vectors in its own registers (no call with
// the 32-byte vector ABI, which differs between the clones)
__attribute__((always_inline)) inline kmlip_v4d load4(const double *p)
{
  kmlip_v4d v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline void store4(double *p, kmlip_v4d v)
{
  std::memcpy(p, &v, sizeof(v));
}

KMLIP_CLONES
void gemm_tiles(int nb, int64_t K, int64_t n, const double *A, int64_t lda, const double *B,
                int64_t ldb, double *C, int64_t ldc)
{
  // explicit 4-wide vectors (GCC/Clang vector extension; two SSE2 registers each in the
  // default clone): the compiler's own vectoriser ran along k with scalar accumulators
  for (int b0 = 0; b0 < nb; b0 += 4) {
    const double *a0 = A + (int64_t) b0 * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
    for (int64_t m0 = 0; m0 < n; m0 += 8) {
      kmlip_v4d c0a = {0, 0, 0, 0}, c0b = c0a, c1a = c0a, c1b = c0a, c2a = c0a, c2b = c0a,
                c3a = c0a, c3b = c0a;
      for (int64_t k = 0; k < K; ++k) {
        const double *bk = B + k * ldb + m0;
        const kmlip_v4d ba = load4(bk), bb = load4(bk + 4);
        const double x0 = a0[k], x1 = a1[k], x2 = a2[k], x3 = a3[k];
        c0a += x0 * ba;
        c0b += x0 * bb;
        c1a += x1 * ba;
        c1b += x1 * bb;
        c2a += x2 * ba;
        c2b += x2 * bb;
        c3a += x3 * ba;
        c3b += x3 * bb;
      }
      double *r = C + (int64_t) b0 * ldc + m0;
      store4(r, c0a);
      store4(r + 4, c0b);
      store4(r + ldc, c1a);
      store4(r + ldc + 4, c1b);
      store4(r + 2 * ldc, c2a);
      store4(r + 2 * ldc + 4, c2b);
      store4(r + 3 * ldc, c3a);
      store4(r + 3 * ldc + 4, c3b);
    }
  }
}

inline int64_t pad8(int64_t n)
{
  return (n + 7) / 8 * 8;
}

}    // namespace

/* ---------------------------------------------------------------------- */

PairKMLIP::PairKMLIP(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  // the per-atom virial splits each pair term in halves (no centroid form)
  centroidstressflag = 2;    // CENTROID_NOTAVAIL
}

PairKMLIP::~PairKMLIP()
{
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

void PairKMLIP::allocate()
{
  allocated = 1;
  const int n = atom->ntypes;
  memory->create(setflag, n + 1, n + 1, "pair:setflag");
  memory->create(cutsq, n + 1, n + 1, "pair:cutsq");
  for (int i = 1; i <= n; i++)
    for (int j = i; j <= n; j++) setflag[i][j] = 0;
}

/* ---------------------------------------------------------------------- */

void PairKMLIP::settings(int narg, char **arg)
{
  int iarg = 0;
  while (iarg < narg) {
    const std::string key = arg[iarg];
    if (key == "uncertainty") {
      if (iarg + 2 > narg) error->all(FLERR, "pair_style kmlip: 'uncertainty' needs yes or no");
      always_uncertainty = utils::logical(FLERR, arg[iarg + 1], false, lmp);
      iarg += 2;
    } else {
      error->all(FLERR, "pair_style kmlip: unknown keyword '" + key
                 + "' (usage: pair_style kmlip [uncertainty yes|no])");
    }
  }
}

/* ---------------------------------------------------------------------- */

static int64_t read_file(const std::string &path, std::vector<char> &blob)
{
  std::ifstream in(path, std::ios::binary);
  if (!in) return -1;
  in.seekg(0, std::ios::end);
  const int64_t size = (int64_t) in.tellg();
  in.seekg(0, std::ios::beg);
  blob.resize((size_t) std::max<int64_t>(size, 0));
  if (size > 0 && !in.read(blob.data(), size)) return -1;
  return size;
}

#ifndef KMLIP_PYTHON
#define KMLIP_PYTHON "python3"
#endif

// A kmlip model file (.kmlip, a ZIP archive) is converted to the export by the Python that
// built this plugin, once, on rank 0, at pair_coeff time (never during the run): the export
// holds the descriptor's tables exactly as kmlip computed them. Returns "" on success.
static std::string convert_model_file(const char *path, std::vector<char> &blob, int64_t &size)
{
  char tmpl[] = "/tmp/kmlip-lammps-XXXXXX";
  const int fd = mkstemp(tmpl);
  if (fd < 0) return "cannot create a temporary file for its export";
  close(fd);
  const std::string out(tmpl);
  std::string quoted = "'";
  for (const char *c = path; *c; ++c) quoted += (*c == '\'') ? std::string("'\\''") : std::string(1, *c);
  quoted += "'";
  const std::string cmd = std::string("'") + KMLIP_PYTHON + "' -m kmlip.lammps.export " + quoted
                          + " '" + out + "' 2>&1";
  std::string msg;
  FILE *pipe = popen(cmd.c_str(), "r");
  if (!pipe) return "cannot run " + std::string(KMLIP_PYTHON) + " to export it";
  char line[512];
  while (fgets(line, sizeof line, pipe)) msg += line;
  const int status = pclose(pipe);
  if (status != 0) {
    std::remove(out.c_str());
    while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
    const size_t nl = msg.rfind('\n');
    return "its export failed (" + (nl == std::string::npos ? msg : msg.substr(nl + 1)) + ")";
  }
  size = read_file(out, blob);
  std::remove(out.c_str());
  return size < 0 ? "cannot read its export" : "";
}

void PairKMLIP::read_model(const char *path)
{
  // rank 0 reads the file, every rank parses the same bytes
  std::vector<char> blob;
  int64_t size = -1;
  std::string failure;
  if (comm->me == 0) {
    size = read_file(path, blob);
    if (size >= 2 && blob[0] == 'P' && blob[1] == 'K') {
      failure = convert_model_file(path, blob, size);
      if (!failure.empty()) size = -2;
    }
  }
  MPI_Bcast(&size, 1, MPI_INT64_T, 0, world);
  if (size == -2) {
    int64_t n = (int64_t) failure.size();
    MPI_Bcast(&n, 1, MPI_INT64_T, 0, world);
    failure.resize((size_t) n);
    MPI_Bcast(failure.data(), (int) n, MPI_CHAR, 0, world);
    error->all(FLERR, std::string("pair_coeff kmlip: model file '") + path + "': " + failure);
  }
  if (size < 0)
    error->all(FLERR, std::string("pair_coeff kmlip: cannot read the model file '") + path + "'");
  blob.resize((size_t) size);
  const int64_t chunk = 1 << 30;
  for (int64_t off = 0; off < size; off += chunk) {
    const int n = (int) std::min(chunk, size - off);
    MPI_Bcast(blob.data() + off, n, MPI_BYTE, 0, world);
  }

  const std::string where = std::string("pair_coeff kmlip: model file '") + path + "': ";
  const size_t lm = sizeof(MAGIC) - 1;
  if (blob.size() < lm || std::memcmp(blob.data(), MAGIC, lm) != 0) {
    const bool zip = blob.size() >= 2 && blob[0] == 'P' && blob[1] == 'K';
    error->all(FLERR, where + (zip ? "a ZIP file that is not a kmlip model"
                                   : "neither a kmlip model file nor its LAMMPS export"));
  }
  try {
    size_t pos = lm;
    size_t eol = pos;
    while (eol < blob.size() && blob[eol] != '\n') ++eol;
    if (eol >= blob.size()) throw std::runtime_error("truncated header");
    const int64_t hlen = std::stoll(std::string(blob.data() + pos, eol - pos));
    pos = eol + 1;
    if (hlen <= 0 || pos + (size_t) hlen > blob.size()) throw std::runtime_error("truncated header");
    const json h = json::parse(std::string(blob.data() + pos, (size_t) hlen));
    size_t data_start = pos + (size_t) hlen;
    data_start += (8 - data_start % 8) % 8;

    if (h.at("format").get<std::string>() != "kmlip-lammps")
      throw std::runtime_error("not a kmlip LAMMPS export");
    const int version = h.at("format_version").get<int>();
    if (version > FORMAT_VERSION)
      throw std::runtime_error("format_version " + std::to_string(version) + " is newer than this "
                               "plugin reads (" + std::to_string(FORMAT_VERSION) + "); rebuild "
                               "the plugin with `kmlip lammps build`");
    const json &d = h.at("descriptor");
    if (d.at("type").get<std::string>() != "SOAP")
      throw std::runtime_error("only single-SOAP models are supported");
    n_max = d.at("n_max").get<int64_t>();
    l_max = d.at("l_max").get<int64_t>();
    n_desc_species = d.at("n_species").get<int64_t>();
    n_features = d.at("n_features").get<int64_t>();
    cutoff = d.at("cutoff").get<double>();
    cutoff_width = d.at("cutoff_width").get<double>();
    center_weight = d.at("center_weight").get<double>();
    normalize = d.at("normalize").get<bool>();
    const std::string comp = d.at("compression").get<std::string>();
    if (comp == "off") compression = 0;
    else if (comp == "mu1nu1") compression = 1;
    else if (comp == "mu2") compression = 2;
    else throw std::runtime_error("unknown SOAP compression '" + comp + "'");
    desc_species_z = d.at("species_z").get<std::vector<int>>();
    if ((int64_t) desc_species_z.size() != n_desc_species || n_max < 1 || l_max < 0
        || n_features < 1 || !(cutoff > 0.0))
      throw std::runtime_error("inconsistent descriptor description");

    const json &arrays = h.at("arrays");
    const int64_t L1 = l_max + 1, N = n_max;
    const int64_t S_eff = (compression == 2) ? 1 : n_desc_species;
    const int64_t R = S_eff * N;
    soap_A = take_array<double>(arrays, "soap_A", "<f8", blob, data_start, {L1, N});
    soap_B = take_array<double>(arrays, "soap_B", "<f8", blob, data_start, {L1, N, N});
    const std::vector<int64_t> tshape =
        (compression == 1) ? std::vector<int64_t>{L1, n_desc_species * N, N}
                           : std::vector<int64_t>{L1, R, R};
    soap_feat_index = take_array<int64_t>(arrays, "soap_feat_index", "<i8", blob, data_start, tshape);
    soap_feat_scale = take_array<double>(arrays, "soap_feat_scale", "<f8", blob, data_start, tshape);
    soap_ylm_norm = take_array<double>(arrays, "soap_ylm_norm", "<f8", blob, data_start, {L1 * L1});
    for (auto fi : soap_feat_index)
      if (fi >= n_features) throw std::runtime_error("feature index out of range");
    // unused (-1) slots of the full layout lie below the diagonal, never read

    zeta = h.at("zeta").get<int>();
    delta = h.at("delta").get<double>();
    if (zeta < 1 || !(delta > 0.0)) throw std::runtime_error("invalid zeta or delta");

    z_offset.assign(N_Z, -1);
    z_count.assign(N_Z, 0);
    z_factor.assign(N_Z, 0);
    z_e0.assign(N_Z, 0.0);
    z_in_model.assign(N_Z, 0);
    z_desc_index.assign(N_Z, -1);
    for (size_t k = 0; k < desc_species_z.size(); ++k) {
      const int z = desc_species_z[k];
      if (z < 1 || z >= N_Z) throw std::runtime_error("invalid atomic number in the descriptor");
      z_desc_index[z] = (int) k;
    }
    model_species.clear();
    for (const auto &s : h.at("species")) {
      const std::string sym = s.get<std::string>();
      const int z = symbol_to_z(sym);
      if (z == 0 || z_desc_index[z] < 0) throw std::runtime_error("invalid species " + sym);
      z_in_model[z] = 1;
      model_species.push_back(sym);
    }
    for (auto it = h.at("e0").begin(); it != h.at("e0").end(); ++it) {
      const int z = symbol_to_z(it.key());
      if (z == 0) throw std::runtime_error("invalid e0 key " + it.key());
      z_e0[z] = it.value().get<double>();
    }
    int64_t M = 0, factor_off = 0;
    for (const auto &c : h.at("columns")) {
      const int z = c.at("Z").get<int>();
      if (z < 1 || z >= N_Z || !z_in_model[z]) throw std::runtime_error("invalid column block");
      const int64_t off = c.at("offset").get<int64_t>(), cnt = c.at("count").get<int64_t>();
      if (off != M || cnt < 1) throw std::runtime_error("inconsistent column blocks");
      z_offset[z] = off;
      z_count[z] = cnt;
      z_factor[z] = factor_off;
      M += cnt;
      factor_off += cnt * cnt;
    }
    points_hat = take_array<double>(arrays, "points_hat", "<f8", blob, data_start, {M, n_features});
    alpha = take_array<double>(arrays, "alpha", "<f8", blob, data_start, {M});
    // per species: T = S_hat^T (F, pad8(M_z)) and S_hat (M_z, pad8(F)), zero-padded for the
    // 4 x 8 tiles of the kernel's two products
    const int64_t Fp = pad8(n_features);
    points_t_off.assign(N_Z, 0);
    points_p_off.assign(N_Z, 0);
    int64_t tsize = 0, psize = 0;
    for (int zz = 1; zz < N_Z; ++zz) {
      if (z_offset[zz] < 0) continue;
      points_t_off[zz] = tsize;
      points_p_off[zz] = psize;
      tsize += n_features * pad8(z_count[zz]);
      psize += z_count[zz] * Fp;
    }
    points_hat_t.assign((size_t) tsize, 0.0);
    points_hat_p.assign((size_t) psize, 0.0);
    for (int zz = 1; zz < N_Z; ++zz) {
      const int64_t o = z_offset[zz], cnt = z_count[zz], mp = pad8(cnt);
      if (o < 0) continue;
      const double *src = points_hat.data() + o * n_features;
      double *dt = points_hat_t.data() + points_t_off[zz];
      double *dp = points_hat_p.data() + points_p_off[zz];
      for (int64_t m = 0; m < cnt; ++m)
        for (int64_t q = 0; q < n_features; ++q) {
          dt[q * mp + m] = src[m * n_features + q];
          dp[m * Fp + q] = src[m * n_features + q];
        }
    }
    var_factor = take_array<double>(arrays, "variance_factor", "<f8", blob, data_start, {factor_off});
    nov_factor = take_array<double>(arrays, "novelty_factor", "<f8", blob, data_start, {factor_off});

    has_ewald = false;
    ewald_per_species = false;
    z_charge.assign(N_Z, 0.0);
    z_has_charge.assign(N_Z, 0);
    const json &b = h.at("baseline");
    if (!b.is_null()) {
      if (b.at("type").get<std::string>() != "Ewald")
        throw std::runtime_error("unsupported baseline " + b.at("type").get<std::string>());
      has_ewald = true;
      const json &q = b.at("charges");
      if (!q.is_null()) {
        ewald_per_species = true;
        for (auto it = q.begin(); it != q.end(); ++it) {
          int z = symbol_to_z(it.key());
          if (z == 0) z = std::atoi(it.key().c_str());
          if (z < 1 || z >= N_Z) throw std::runtime_error("invalid charge key " + it.key());
          z_charge[z] = it.value().get<double>();
          z_has_charge[z] = 1;
        }
      }
    }
    const json &cal = h.at("calibration");
    cal_measure = cal.at("measure").get<std::string>() == "energies_var" ? 1 : 0;
    cal_scale = cal.at("scale").get<double>();
    cal_floor = cal.at("floor").get<double>();
  } catch (std::exception &e) {
    error->all(FLERR, where + e.what());
  }

  params.n_max = n_max;
  params.l_max = l_max;
  params.n_species = (compression == 2) ? 1 : n_desc_species;
  params.n_features = n_features;
  params.r_cut = cutoff;
  params.cutoff_width = cutoff_width;
  params.center_weight = center_weight;
  params.A = soap_A.data();
  params.B = soap_B.data();
  params.feat_index = soap_feat_index.data();
  params.feat_scale = soap_feat_scale.data();
  params.ylm_norm = soap_ylm_norm.data();
  model_path = path;
}

/* ---------------------------------------------------------------------- */

void PairKMLIP::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg != 3 + ntypes)
    error->all(FLERR, "pair_coeff kmlip: usage is pair_coeff * * MODEL ELEMENT... with one "
               "element (or NULL) per atom type: " + std::to_string(ntypes) + " types, got "
               + std::to_string(narg - 3) + " names");
  if (std::strcmp(arg[0], "*") != 0 || std::strcmp(arg[1], "*") != 0)
    error->all(FLERR, "pair_coeff kmlip: the type range must be * *");
  read_model(arg[2]);

  type_z.assign(ntypes + 1, 0);
  type_symbol.assign(ntypes + 1, "NULL");
  for (int t = 1; t <= ntypes; ++t) {
    const std::string sym = arg[2 + t];
    type_symbol[t] = sym;
    if (sym == "NULL") continue;
    const int z = symbol_to_z(sym);
    if (z == 0)
      error->all(FLERR, "pair_coeff kmlip: '" + sym + "' (type " + std::to_string(t)
                 + ") is not a chemical symbol");
    if (!z_in_model[z]) {
      std::string have;
      for (const auto &s : model_species) have += (have.empty() ? "" : " ") + s;
      error->all(FLERR, "pair_coeff kmlip: species " + sym + " (type " + std::to_string(t)
                 + ") is not in the model " + model_path + " (model species: " + have + ")");
    }
    type_z[t] = z;
  }
  int count = 0;
  for (int i = 1; i <= ntypes; ++i)
    for (int j = i; j <= ntypes; ++j) {
      setflag[i][j] = (type_z[i] > 0 && type_z[j] > 0) ? 1 : 0;
      count += setflag[i][j];
    }
  if (count == 0) error->all(FLERR, "pair_coeff kmlip: no atom type is mapped to a species");
}

/* ---------------------------------------------------------------------- */

void PairKMLIP::init_style()
{
  if (force->newton_pair == 0)
    error->all(FLERR, "pair style kmlip requires newton pair on (forces on ghost atoms)");
  neighbor->add_request(this, NeighConst::REQ_FULL);

  if (!has_ewald) return;
  if (force->pair_match("^coul/long", 0, 0) == nullptr || force->kspace == nullptr)
    error->all(FLERR, "pair style kmlip: the model " + model_path + " was fitted with an Ewald "
               "baseline; run it as pair_style hybrid/overlay kmlip coul/long RCUT with "
               "pair_coeff * * coul/long, kspace_style ewald (or pppm) 1e-6 and the model's "
               "charges on the atoms");
  if (!atom->q_flag)
    error->all(FLERR, "pair style kmlip: the model's Ewald baseline needs atom charges (an "
               "atom style with q, e.g. atom_style charge)");
  if (!ewald_per_species) return;
  int bad = 0;
  std::string msg;
  for (int i = 0; i < atom->nlocal; ++i) {
    const int z = type_z[atom->type[i]];
    if (z == 0) continue;
    const double want = z_has_charge[z] ? z_charge[z] : 0.0;
    if (std::fabs(atom->q[i] - want) > 1e-10 * std::max(1.0, std::fabs(want))) {
      if (!bad)
        msg = "atom of type " + std::to_string(atom->type[i]) + " (" + ELEMENTS[z] + ") has charge "
              + std::to_string(atom->q[i]) + ", the model's Ewald baseline has "
              + std::to_string(want);
      bad = 1;
    }
  }
  int any = 0;
  MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, world);
  if (any) {
    if (bad) error->one(FLERR, "pair style kmlip: " + msg + " (set the charges with `set type T "
                        "charge Q`)");
    error->all(FLERR, "pair style kmlip: atom charges differ from the model's Ewald baseline");
  }
}

double PairKMLIP::init_one(int i, int j)
{
  if (setflag[i][j] == 0 && !(type_z[i] > 0 && type_z[j] > 0)) return 0.0;
  return cutoff;
}

/* ---------------------------------------------------------------------- */

void PairKMLIP::grow_peratom()
{
  if (atom->nmax > nmax_peratom || at_variance.empty()) {
    nmax_peratom = atom->nmax > 1 ? atom->nmax : 1;
    at_variance.assign((size_t) nmax_peratom, 0.0);
    at_novelty.assign((size_t) nmax_peratom, 0.0);
    at_uncertainty.assign((size_t) nmax_peratom, 0.0);
  }
}

/* ---------------------------------------------------------------------- */

void PairKMLIP::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  const bool want_unc = always_uncertainty || trigger_variance || trigger_novelty
                        || trigger_uncertainty;
  if (want_unc) {
    grow_peratom();
    std::fill(at_variance.begin(), at_variance.end(), 0.0);
    std::fill(at_novelty.begin(), at_novelty.end(), 0.0);
    std::fill(at_uncertainty.begin(), at_uncertainty.end(), 0.0);
  }
  // local centres grouped by species, processed in blocks: the kernel against the species'
  // sparse points is then two small matrix products per block instead of matrix-vector
  // products per centre (each sparse point is read once per block, not once per atom)
  by_species.resize((size_t) n_desc_species);
  for (auto &v : by_species) v.clear();
  const int *type = atom->type;
  for (int ii = 0; ii < list->inum; ++ii) {
    const int i = list->ilist[ii];
    const int z = type_z[type[i]];
    if (z) by_species[(size_t) z_desc_index[z]].push_back(i);
  }
  for (int64_t k = 0; k < n_desc_species; ++k) {
    const auto &centres = by_species[(size_t) k];
    for (size_t start = 0; start < centres.size(); start += BLOCK) {
      const int nb = (int) std::min<size_t>(BLOCK, centres.size() - start);
      compute_block(centres.data() + start, nb, desc_species_z[(size_t) k], want_unc);
    }
  }
  if (vflag_fdotr) virial_fdotr_compute();
}

// flatten: kmlip's static-inline SOAP steps are inlined into (and vectorised for) each clone
KMLIP_CLONES __attribute__((flatten))
void PairKMLIP::compute_block(const int *centres, int nb, int z, bool want_unc)
{
  double **x = atom->x;
  double **f = atom->f;
  const int *type = atom->type;
  const int nlocal = atom->nlocal;
  const double cut2 = cutoff * cutoff;
  const int64_t F = n_features;
  const double d2 = delta * delta;
  const int64_t Mz = z_count[z];
  const int64_t cs = (compression == 2) ? 0 : z_desc_index[z];

  // 1. neighbours within the SOAP cutoff (strict, as kmlip's neighbour list), per centre
  pair_off.assign(BLOCK + 1, 0);
  int64_t npairs = 0;
  for (int b = 0; b < nb; ++b) {
    const int i = centres[b];
    const int jnum = list->numneigh[i];
    const int *jlist = list->firstneigh[i];
    if ((int64_t) spec.size() < npairs + jnum + 1) {
      const size_t cap = (size_t) (2 * (npairs + jnum + 1));
      vec.resize(3 * cap);
      spec.resize(cap);
      jidx.resize(cap);
    }
    const double xi = x[i][0], yi = x[i][1], zi = x[i][2];
    for (int jj = 0; jj < jnum; ++jj) {
      const int j = jlist[jj] & NEIGHMASK;
      const int zj = type_z[type[j]];
      if (zj == 0) continue;
      const double dx = x[j][0] - xi, dy = x[j][1] - yi, dz = x[j][2] - zi;
      if (dx * dx + dy * dy + dz * dz >= cut2) continue;
      vec[3 * npairs] = dx;
      vec[3 * npairs + 1] = dy;
      vec[3 * npairs + 2] = dz;
      spec[npairs] = (compression == 2) ? 0 : z_desc_index[zj];
      jidx[npairs] = j;
      ++npairs;
    }
    pair_off[b + 1] = npairs;
  }
  if (spec.empty()) {
    vec.resize(3);
    spec.resize(1);
    jidx.resize(1);
  }

  // 2. one SOAP workspace per centre (kept from the features to the vector-Jacobian product)
  work_off.assign(BLOCK + 1, 0);
  for (int b = 0; b < nb; ++b) {
    const int64_t n = pair_off[b + 1] - pair_off[b];
    const int64_t size = (compression == 1) ? kmlip_soap_mu1nu1_work_size(&params, n)
                                            : kmlip_soap_work_size(&params, n);
    work_off[b + 1] = work_off[b] + (size + 7) / 8 * 8;
  }
  if ((int64_t) work.size() < work_off[nb]) work.resize((size_t) work_off[nb]);
  const int64_t Fp = pad8(F), Mp = pad8(Mz);
  const int nb4 = (nb + 3) / 4 * 4;
  if ((int64_t) feat.size() < BLOCK * Fp) {
    feat_raw.resize((size_t) (BLOCK * Fp));
    feat.resize((size_t) (BLOCK * Fp));
    kv.resize((size_t) (BLOCK * Fp));
  }
  std::fill(feat.begin(), feat.begin() + nb4 * Fp, 0.0);

  // 3. features (raw, then unit if the descriptor normalises); rows of stride Fp
  for (int b = 0; b < nb; ++b) {
    const int64_t n = pair_off[b + 1] - pair_off[b];
    const double *vb = vec.data() + 3 * pair_off[b];
    const int64_t *sb = spec.data() + pair_off[b];
    double *wb = work.data() + work_off[b];
    double *pr = feat_raw.data() + b * Fp;
    if (compression == 1) {
      kmlip_soap_centre_mu1nu1(&params, cs, n, vb, sb, wb, pr, nullptr);
    } else {
      const kmlip_soap_workspace ws = kmlip_soap_workspace_(&params, wb);
      kmlip_soap_expand_(&params, cs, n, vb, sb, &ws, (Mz && n) ? 1 : 0);
      kmlip_soap_power_spectrum_(&params, ws.C, ws.P, pr);
    }
    double *pf = feat.data() + b * Fp;
    std::memcpy(pf, pr, sizeof(double) * (size_t) F);
    if (normalize) kmlip_soap_normalize(F, pf, 0, nullptr);
  }

  // 4. kernel: c = p_hat . s_hat_m, eps = sum_m alpha_m c^zeta and dE/dp (DESIGN.md, "Kernel")
  //    as two tiled products per block, C = P S_hat^T and V = W S_hat with W = alpha c^(zeta-1)
  double eps[BLOCK], inv[BLOCK];
  for (int b = 0; b < nb; ++b) {
    const double *pf = feat.data() + b * Fp;
    double nrm = 0.0;
    for (int64_t q = 0; q < F; ++q) nrm += pf[q] * pf[q];
    inv[b] = nrm > 0.0 ? 1.0 / std::sqrt(nrm) : 0.0;
    eps[b] = 0.0;
  }
  if (Mz) {
    if ((int64_t) kc.size() < BLOCK * Mp) {
      kc.resize((size_t) (BLOCK * Mp));
      kw.resize((size_t) (BLOCK * Mp));
    }
    const double *T = points_hat_t.data() + points_t_off[z];    // (F, Mp)
    const double *S = points_hat_p.data() + points_p_off[z];    // (Mz, Fp)
    const double *al = alpha.data() + z_offset[z];
    gemm_tiles(nb4, F, Mp, feat.data(), Fp, T, Mp, kc.data(), Mp);
    std::fill(kw.begin(), kw.begin() + nb4 * Mp, 0.0);
    for (int b = 0; b < nb; ++b) {
      double *cb = kc.data() + b * Mp, *wbk = kw.data() + b * Mp;
      double e = 0.0;
      for (int64_t m = 0; m < Mz; ++m) {
        const double c = cb[m] * inv[b];
        double cz1 = 1.0;
        for (int t = 0; t < zeta - 1; ++t) cz1 *= c;
        cb[m] = c;
        wbk[m] = al[m] * cz1;
        e += wbk[m] * c;
      }
      eps[b] = e;
    }
    gemm_tiles(nb4, Mz, Fp, kw.data(), Mp, S, Fp, kv.data(), Fp);
    for (int b = 0; b < nb; ++b) {
      double *vb = kv.data() + b * Fp;
      const double *pf = feat.data() + b * Fp;
      const double fac = d2 * zeta * inv[b], proj = eps[b] * inv[b];
      for (int64_t q = 0; q < F; ++q) vb[q] = fac * (vb[q] - proj * pf[q]);
      eps[b] *= d2;
    }
  }

  // 5. energies, then dE/dr_ij of every pair into forces and virial
  for (int b = 0; b < nb; ++b) {
    const int i = centres[b];
    const double ei = z_e0[z] + eps[b];
    if (eflag_global) eng_vdwl += ei;
    if (eflag_atom) eatom[i] += ei;
    const int64_t n = pair_off[b + 1] - pair_off[b];
    if (!Mz || !n || inv[b] == 0.0) continue;
    const double *vb = vec.data() + 3 * pair_off[b];
    const int64_t *sb = spec.data() + pair_off[b];
    const int *jb = jidx.data() + pair_off[b];
    double *wb = work.data() + work_off[b];
    const double *v = kv.data() + b * Fp;
    if ((int64_t) gpair.size() < 3 * n) gpair.resize((size_t) (6 * n));
    if (compression == 1) {
      kmlip_soap_centre_vjp_mu1nu1(&params, cs, n, vb, sb, v, normalize ? 1 : 0, wb,
                                   gpair.data());
    } else {
      const kmlip_soap_workspace ws = kmlip_soap_workspace_(&params, wb);
      const int64_t R = params.n_species * n_max, LM = (l_max + 1) * (l_max + 1);
      double *H = ws.adj, *U = H + R * LM, *vv = U + R * R;
      std::memcpy(vv, v, sizeof(double) * (size_t) F);
      if (normalize) kmlip_soap_cotangent_(F, feat_raw.data() + b * Fp, vv);
      kmlip_soap_adjoint_(&params, ws.C, vv, U, H);
      for (int64_t k = 0; k < n; ++k)
        kmlip_soap_pair_vjp_(&params, H, ws.Sall + k * ws.stride, sb[k], vb + 3 * k,
                             gpair.data() + 3 * k);
    }
    for (int64_t k = 0; k < n; ++k) {
      const int j = jb[k];
      const double gx = gpair[3 * k], gy = gpair[3 * k + 1], gz = gpair[3 * k + 2];
      f[i][0] += gx;
      f[i][1] += gy;
      f[i][2] += gz;
      f[j][0] -= gx;
      f[j][1] -= gy;
      f[j][2] -= gz;
      // (x_i - x_j) (x) f_i with f_i = g: LAMMPS's pairwise virial tally (global when not
      // fdotr, per-atom halves to i and j)
      if (vflag_either)
        ev_tally_xyz(i, j, nlocal, 1, 0.0, 0.0, gx, gy, gz, -vb[3 * k], -vb[3 * k + 1],
                     -vb[3 * k + 2]);
    }
  }

  // 6. epistemic variance, novelty and calibrated uncertainty of the local energies
  if (!want_unc) return;
  for (int b = 0; b < nb; ++b) {
    const int i = centres[b];
    const double kss = inv[b] > 0.0 ? 1.0 : 0.0;
    double expl_var = 0.0, expl_nov = 0.0;
    if (Mz && inv[b] > 0.0) {
      krow.resize((size_t) Mz);
      for (int64_t m = 0; m < Mz; ++m) {
        const double c = kc[(size_t) (b * Mp + m)];
        double kz = 1.0;
        for (int t = 0; t < zeta; ++t) kz *= c;
        krow[(size_t) m] = kz;
      }
      const double *Hz = var_factor.data() + z_factor[z];
      const double *Wz = nov_factor.data() + z_factor[z];
      for (int64_t a = 0; a < Mz; ++a) {
        double hv = 0.0, wv = 0.0;
        for (int64_t c = 0; c <= a; ++c) {
          hv += Hz[a * Mz + c] * krow[(size_t) c];
          wv += Wz[a * Mz + c] * krow[(size_t) c];
        }
        expl_var += hv * hv;
        expl_nov += wv * wv;
      }
    }
    const double var = std::max(d2 * (kss - expl_var), 0.0);
    const double nov = std::max(d2 * (kss - expl_nov), 0.0);
    at_variance[i] = var;
    at_novelty[i] = nov;
    const double m = cal_measure == 1 ? var : nov;
    at_uncertainty[i] = std::sqrt(cal_floor * cal_floor + cal_scale * cal_scale * m);
  }
}

/* ---------------------------------------------------------------------- */

void *PairKMLIP::extract(const char *name, int &dim)
{
  dim = 0;
  if (std::strcmp(name, "variance_flag") == 0 || std::strcmp(name, "energies_var_flag") == 0)
    return (void *) &trigger_variance;
  if (std::strcmp(name, "novelty_flag") == 0) return (void *) &trigger_novelty;
  if (std::strcmp(name, "uncertainty_flag") == 0) return (void *) &trigger_uncertainty;
  return nullptr;
}

void *PairKMLIP::extract_peratom(const char *name, int &ncols)
{
  ncols = 0;
  const bool v = std::strcmp(name, "variance") == 0 || std::strcmp(name, "energies_var") == 0;
  const bool nv = std::strcmp(name, "novelty") == 0;
  const bool u = std::strcmp(name, "uncertainty") == 0;
  if (!(v || nv || u)) return nullptr;
  grow_peratom();
  if (v) return (void *) at_variance.data();
  if (nv) return (void *) at_novelty.data();
  return (void *) at_uncertainty.data();
}

double PairKMLIP::memory_usage()
{
  double bytes = Pair::memory_usage();
  bytes += 8.0 * (points_hat.size() + alpha.size() + var_factor.size() + nov_factor.size()
                  + soap_A.size() + soap_B.size() + soap_feat_index.size()
                  + soap_feat_scale.size() + soap_ylm_norm.size());
  bytes += 8.0 * (points_hat_t.size() + points_hat_p.size() + work.size() + vec.size() + gpair.size() + feat.size()
                  + feat_raw.size() + kc.size() + kw.size() + kv.size() + krow.size())
           + 4.0 * (spec.size() + jidx.size());
  bytes += 24.0 * nmax_peratom;
  return bytes;
}
