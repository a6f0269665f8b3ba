/* LAMMPS pair style "kmlip": SOAP + sparse-GP potentials of kmlip, loaded as a plugin.
 *
 *   plugin load /abs/path/kmlip_lammps.so          (printed by `kmlip lammps build`)
 *   pair_style kmlip [uncertainty yes|no]
 *   pair_coeff * * model.kmlip.lammps Cu Al        (one element or NULL per atom type)
 *
 * The model file is the export written by `kmlip lammps export` (kmlip/lammps/export.py).
 * Per centre the style calls kmlip's C kernels (kmlip/_ext/soap_core.h): the SOAP expansion and
 * power spectrum; the local energies and their feature gradients per block of centres; then the
 * vector-Jacobian product that gives dE/dr_ij for every pair, accumulated into the forces of
 * the centre and of its (possibly ghost) neighbours; newton_pair on, full neighbour list.
 */
#ifndef KMLIP_PAIR_KMLIP_H
#define KMLIP_PAIR_KMLIP_H

#include "pair.h"

#include <cstdint>
#include <string>
#include <vector>

#include "soap_core.h"

namespace LAMMPS_NS {

class PairKMLIP : public Pair {
 public:
  PairKMLIP(class LAMMPS *);
  ~PairKMLIP() override;
  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;
  void *extract(const char *, int &) override;
  void *extract_peratom(const char *, int &) override;
  double memory_usage() override;

 private:
  // model (see kmlip/lammps/export.py for the file layout)
  std::string model_path;
  int64_t n_max = 0, l_max = 0, n_desc_species = 0, n_features = 0;
  double cutoff = 0.0, cutoff_width = 0.0, center_weight = 0.0;
  bool normalize = false;
  int compression = 0;    // 0 off, 1 mu1nu1, 2 mu2
  std::vector<int> desc_species_z;
  std::vector<double> soap_A, soap_B, soap_feat_scale, soap_ylm_norm;
  std::vector<int64_t> soap_feat_index;
  kmlip_soap_params params{};
  int zeta = 1;
  double delta = 1.0;
  std::vector<double> points_hat, alpha, var_factor, nov_factor;
  // per atomic number (0..118): column block, e0, whether the model predicts it
  std::vector<int64_t> z_offset, z_count, z_factor;
  std::vector<double> z_e0;
  std::vector<int> z_in_model, z_desc_index;
  std::vector<std::string> model_species;
  bool has_ewald = false;
  bool ewald_per_species = false;
  std::vector<double> z_charge;
  std::vector<int> z_has_charge;
  int cal_measure = 0;    // 0 novelty, 1 energies_var
  double cal_scale = 1.0, cal_floor = 0.02;

  // type map (index 1..ntypes): atomic number or 0 for NULL
  std::vector<int> type_z;
  std::vector<std::string> type_symbol;

  // per-atom uncertainty output, sized atom->nmax
  int always_uncertainty = 0;
  int trigger_variance = 0, trigger_novelty = 0, trigger_uncertainty = 0;
  int nmax_peratom = 0;
  std::vector<double> at_variance, at_novelty, at_uncertainty;

  // sparse points per species, zero-padded for the kernel's tiled products: transposed
  // (F, pad8(M_z)) and as rows (M_z, pad8(F))
  std::vector<double> points_hat_t, points_hat_p;
  std::vector<int64_t> points_t_off, points_p_off;    // per atomic number

  // scratch of one block of centres of one species (see compute())
  static constexpr int BLOCK = 32;
  std::vector<double> work;              // per-centre SOAP workspaces, concatenated
  std::vector<int64_t> work_off;         // (BLOCK + 1) offsets into work
  std::vector<double> vec;               // pair vectors of the block's centres
  std::vector<int64_t> spec;             // neighbour species indices
  std::vector<int> jidx;                 // neighbour atom indices
  std::vector<int64_t> pair_off;         // (BLOCK + 1) offsets into vec / spec / jidx
  std::vector<double> feat_raw, feat;    // (BLOCK, F) raw and (if normalised) unit features
  std::vector<double> kc, kw, kv;        // (BLOCK, M_z) cosines, weights; (BLOCK, F) dE/dp
  std::vector<double> gpair, krow;
  std::vector<std::vector<int>> by_species;

  void allocate();
  void read_model(const char *path);
  void compute_block(const int *centres, int nb, int z, bool want_unc);
  void grow_peratom();
};

}    // namespace LAMMPS_NS

#endif
