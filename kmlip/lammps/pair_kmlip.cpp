/* LAMMPS pair style "kmlip" (see pair_kmlip.h and the README section "LAMMPS").
 *
 * Energy of local atom i (species z, features p_i of its neighbours within the SOAP cutoff):
 *     E_i = e0[z] + delta^2 sum_m alpha_m (p_hat_i . s_hat_m)^zeta      (sparse points of z)
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
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <sstream>

#include <mpi.h>

#include "contract_core.h"

using namespace LAMMPS_NS;

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

void PairKMLIP::read_model(const char *path)
{
  // rank 0 reads the file, every rank parses the same bytes
  std::vector<char> blob;
  int64_t size = -1;
  if (comm->me == 0) {
    std::ifstream in(path, std::ios::binary);
    if (in) {
      in.seekg(0, std::ios::end);
      size = (int64_t) in.tellg();
      in.seekg(0, std::ios::beg);
      blob.resize((size_t) size);
      if (size > 0 && !in.read(blob.data(), size)) size = -1;
    }
  }
  MPI_Bcast(&size, 1, MPI_INT64_T, 0, world);
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
    error->all(FLERR, where + (zip ? "this is a kmlip model file (.kmlip); LAMMPS reads its "
                                     "export: run `kmlip lammps export MODEL.kmlip OUT` and give "
                                     "OUT to pair_coeff"
                                   : "not a kmlip LAMMPS export (no KMLIP-LAMMPS header)"));
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

void PairKMLIP::ensure_scratch(int64_t n_neigh)
{
  const int64_t cap = n_neigh < 16 ? 16 : n_neigh;
  if ((int64_t) spec.size() >= cap && !work.empty()) return;
  const int64_t size = (compression == 1) ? kmlip_soap_mu1nu1_work_size(&params, cap)
                                          : kmlip_soap_work_size(&params, cap);
  work.assign((size_t) size, 0.0);
  vec.assign((size_t) (3 * cap), 0.0);
  gpair.assign((size_t) (3 * cap), 0.0);
  spec.assign((size_t) cap, 0);
  jidx.assign((size_t) cap, 0);
  praw.assign((size_t) n_features, 0.0);
  pnorm.assign((size_t) n_features, 0.0);
  vgrad.assign((size_t) n_features, 0.0);
}

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

  double **x = atom->x;
  double **f = atom->f;
  const int *type = atom->type;
  const int nlocal = atom->nlocal;
  const int inum = list->inum;
  const int *ilist = list->ilist;
  const int *numneigh = list->numneigh;
  int **firstneigh = list->firstneigh;
  const double cut2 = cutoff * cutoff;
  const int64_t F = n_features;
  const double d2 = delta * delta;
  const bool want_unc = always_uncertainty || trigger_variance || trigger_novelty
                        || trigger_uncertainty;
  if (want_unc) {
    grow_peratom();
    std::fill(at_variance.begin(), at_variance.end(), 0.0);
    std::fill(at_novelty.begin(), at_novelty.end(), 0.0);
    std::fill(at_uncertainty.begin(), at_uncertainty.end(), 0.0);
  }
  ensure_scratch(16);

  for (int ii = 0; ii < inum; ++ii) {
    const int i = ilist[ii];
    const int zi = type_z[type[i]];
    if (zi == 0) continue;
    const double xi = x[i][0], yi = x[i][1], zc = x[i][2];
    const int *jlist = firstneigh[i];
    const int jnum = numneigh[i];
    ensure_scratch(jnum);

    // neighbours within the SOAP cutoff (strict, as kmlip's neighbour list)
    int64_t n = 0;
    for (int jj = 0; jj < jnum; ++jj) {
      const int j = jlist[jj] & NEIGHMASK;
      const int zj = type_z[type[j]];
      if (zj == 0) continue;
      const double dx = x[j][0] - xi, dy = x[j][1] - yi, dz = x[j][2] - zc;
      const double rsq = dx * dx + dy * dy + dz * dz;
      if (rsq >= cut2) continue;
      vec[3 * n] = dx;
      vec[3 * n + 1] = dy;
      vec[3 * n + 2] = dz;
      spec[n] = (compression == 2) ? 0 : z_desc_index[zj];
      jidx[n] = j;
      ++n;
    }
    const int64_t cs = (compression == 2) ? 0 : z_desc_index[zi];
    const int64_t Mz = z_count[zi];
    const double *Sz = Mz ? points_hat.data() + z_offset[zi] * F : nullptr;
    const double *az = Mz ? alpha.data() + z_offset[zi] : nullptr;

    // features, local energy and dE/dp (v), then dE/dr_ij of every pair (gpair)
    double eps = 0.0;
    const double *pf = praw.data();
    if (compression == 1) {
      kmlip_soap_centre_mu1nu1(&params, cs, n, vec.data(), spec.data(), work.data(), praw.data(),
                               nullptr);
      if (normalize) {
        std::memcpy(pnorm.data(), praw.data(), sizeof(double) * F);
        kmlip_soap_normalize(F, pnorm.data(), 0, nullptr);
        pf = pnorm.data();
      }
      if (Mz) {
        eps = kmlip_centre_energy_grad(pf, Sz, az, Mz, F, zeta, d2, vgrad.data());
        if (n)
          kmlip_soap_centre_vjp_mu1nu1(&params, cs, n, vec.data(), spec.data(), vgrad.data(),
                                       normalize ? 1 : 0, work.data(), gpair.data());
      }
    } else {
      // one expansion with the pair derivatives serves the features and the vjp
      // (kmlip_soap_centre + kmlip_soap_centre_vjp would expand twice)
      const kmlip_soap_workspace ws = kmlip_soap_workspace_(&params, work.data());
      kmlip_soap_expand_(&params, cs, n, vec.data(), spec.data(), &ws, Mz && n ? 1 : 0);
      kmlip_soap_power_spectrum_(&params, ws.C, ws.P, praw.data());
      if (normalize) {
        std::memcpy(pnorm.data(), praw.data(), sizeof(double) * F);
        kmlip_soap_normalize(F, pnorm.data(), 0, nullptr);
        pf = pnorm.data();
      }
      if (Mz) {
        eps = kmlip_centre_energy_grad(pf, Sz, az, Mz, F, zeta, d2, vgrad.data());
        if (n) {
          const int64_t R = params.n_species * n_max, LM = (l_max + 1) * (l_max + 1);
          double *H = ws.adj, *U = H + R * LM, *vv = U + R * R;
          std::memcpy(vv, vgrad.data(), sizeof(double) * F);
          if (normalize) kmlip_soap_cotangent_(F, praw.data(), vv);
          kmlip_soap_adjoint_(&params, ws.C, vv, U, H);
          for (int64_t k = 0; k < n; ++k)
            kmlip_soap_pair_vjp_(&params, H, ws.Sall + k * ws.stride, spec[k], vec.data() + 3 * k,
                                 gpair.data() + 3 * k);
        }
      }
    }

    const double ei = z_e0[zi] + eps;
    if (eflag_global) eng_vdwl += ei;
    if (eflag_atom) eatom[i] += ei;

    if (Mz && n) {
      for (int64_t k = 0; k < n; ++k) {
        const int j = jidx[k];
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
          ev_tally_xyz(i, j, nlocal, 1, 0.0, 0.0, gx, gy, gz, -vec[3 * k], -vec[3 * k + 1],
                       -vec[3 * k + 2]);
      }
    }

    if (want_unc) {
      // unit kernel row k_m = (p_hat . s_hat_m)^zeta and its two quadratic forms
      double nrm = 0.0;
      for (int64_t q = 0; q < F; ++q) nrm += pf[q] * pf[q];
      nrm = std::sqrt(nrm);
      const double kss = nrm > 0.0 ? 1.0 : 0.0;
      double expl_var = 0.0, expl_nov = 0.0;
      if (Mz && nrm > 0.0) {
        krow.assign((size_t) Mz, 0.0);
        for (int64_t m = 0; m < Mz; ++m) {
          const double *s = Sz + m * F;
          double c = 0.0;
          for (int64_t q = 0; q < F; ++q) c += pf[q] * s[q];
          c /= nrm;
          double kz = 1.0;
          for (int t = 0; t < zeta; ++t) kz *= c;
          krow[m] = kz;
        }
        const double *Hz = var_factor.data() + z_factor[zi];
        const double *Wz = nov_factor.data() + z_factor[zi];
        for (int64_t a = 0; a < Mz; ++a) {
          double hv = 0.0, wv = 0.0;
          for (int64_t bcol = 0; bcol <= a; ++bcol) {
            hv += Hz[a * Mz + bcol] * krow[bcol];
            wv += Wz[a * Mz + bcol] * krow[bcol];
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

  if (vflag_fdotr) virial_fdotr_compute();
}

/* ---------------------------------------------------------------------- */

void *PairKMLIP::extract(const char *name, int &dim)
{
  dim = 0;
  if (std::strcmp(name, "variance_flag") == 0 || std::strcmp(name, "energies_var_flag") == 0)
    return (void *) &trigger_variance;
  if (std::strcmp(name, "novelty_flag") == 0) return (void *) &trigger_novelty;
  if (std::strcmp(name, "uncertainty_flag") == 0) return (void *) &trigger_uncertainty;
  if (std::strcmp(name, "cut_coul") == 0) return nullptr;
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
  bytes += 8.0 * (work.size() + vec.size() + gpair.size() + praw.size() + pnorm.size()
                  + vgrad.size() + krow.size()) + 8.0 * (spec.size() + jidx.size());
  bytes += 24.0 * nmax_peratom;
  return bytes;
}
