/* What cpu.py asks the library at load: its ABI version, the instruction sets this build
 * uses (see common.h), and the size of the decode step's layer record, which it checks
 * against its ctypes mirror so the two cannot drift apart unnoticed.
 */
#include "common.h"

int tm_abi_version(void) { return TM_ABI_VERSION; }
int tm_has_avx2(void) { return TM_AVX2; }
int tm_has_vnni(void) { return TM_VNNI; }  /* AVX-512 VNNI */
int tm_has_avx_vnni(void) { return TM_VNNI256; }  /* AVX-VNNI without AVX-512 */
int64_t tm_layer_size(void) { return (int64_t)sizeof(tm_layer); }
