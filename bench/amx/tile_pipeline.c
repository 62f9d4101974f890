// What paces an AMX GEMM that scales every group of 32 values (q4_0/q8_0 blocks) on the vector units: the same
// work as crates/kernels/src/kernels/amx.rs (16 weight rows × 16 activation rows × 32 values a tile product, the
// sums stored and scaled into 16 f32 accumulators), in four orders:
//   0: the vector scaling alone (on a fixed buffer);  1: two tile sets alternating (amx.rs's order);
//   2: four C tiles rotating, the product two groups ahead;  3: four products, four stores, four scalings.
//   gcc -O2 -mavx512f -mfma -mamx-tile -mamx-int8 bench/amx/tile_pipeline.c -o /tmp/tile_pipeline
//   for m in 0 1 2 3; do /tmp/tile_pipeline $m; done
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
typedef struct { uint8_t palette, start; uint8_t r[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg_t;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static int32_t buf[4][256] __attribute__((aligned(64)));
static int32_t corr[16*128]; static float ws[16*128], xs[128*16];
#define PROD(C,A,B,g) do{ _tile_loadd(A, a+(g)*32, stride); _tile_loadd(B, b+(g)*512, 64); _tile_zero(C); _tile_dpbsud(C,A,B);}while(0)
static inline void scale(__m512 *acc, const int32_t *c, int g){
  __m512 x = _mm512_loadu_ps(xs+g*16);
  #pragma GCC unroll 16
  for(int r=0;r<16;r++){ __m512i s=_mm512_add_epi32(_mm512_load_si512(c+r*16), _mm512_set1_epi32(corr[r*128+g]));
    acc[r]=_mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s),x), _mm512_set1_ps(ws[r*128+g]), acc[r]); }
}
int main(int argc,char**argv){
  syscall(SYS_arch_prctl, 0x1023, 18);
  int mode = atoi(argv[1]);
  size_t k=4096, stride=k+64;
  cfg_t c; memset(&c,0,sizeof c); c.palette=1;
  for(int i=0;i<4;i++){c.colsb[i]=64;c.rows[i]=16;}
  c.colsb[4]=32;c.rows[4]=16;c.colsb[6]=32;c.rows[6]=16;
  c.colsb[5]=64;c.rows[5]=8;c.colsb[7]=64;c.rows[7]=8;
  _tile_loadconfig(&c);
  int8_t *a = aligned_alloc(64, 16*stride); uint8_t *b = aligned_alloc(64, k*16);
  memset(a,1,16*stride); memset(b,1,k*16);
  __m512 acc[16]; for(int i=0;i<16;i++) acc[i]=_mm512_setzero_ps();
  int groups = 128; long reps = 20000; double t0=now();
  for (long r=0;r<reps;r++) {
    if (mode==0) { // vector only
      for (int g=0; g<groups; g++) scale(acc, buf[g%2], g);
    } else if (mode==1) { // prod(g+1), store(g), scale(g)
      PROD(0,4,5,0);
      for (int g=0; g<groups; g+=2) {
        PROD(1,6,7,g+1); _tile_stored(0, buf[0], 64); scale(acc, buf[0], g);
        if (g+2<groups) PROD(0,4,5,g+2); _tile_stored(1, buf[1], 64); scale(acc, buf[1], g+1);
      }
    } else if (mode==2) { // 4 C tiles, prod g+2, scale g-1 before store g
      PROD(0,4,5,0); PROD(1,6,7,1);
      for (int g=0; g<groups; g+=4) {
        PROD(2,4,5,g+2); if(g) scale(acc, buf[3], g-1); _tile_stored(0, buf[0], 64);
        PROD(3,6,7,g+3); scale(acc, buf[0], g);  _tile_stored(1, buf[1], 64);
        if (g+4<groups) PROD(0,4,5,g+4); scale(acc, buf[1], g+1); _tile_stored(2, buf[2], 64);
        if (g+5<groups) PROD(1,6,7,g+5); scale(acc, buf[2], g+2); _tile_stored(3, buf[3], 64);
      }
      scale(acc, buf[3], groups-1);
    } else if (mode==3) { // batch: 4 prods, 4 stores, then 4 scales
      for (int g=0; g<groups; g+=4) {
        PROD(0,4,5,g); PROD(1,6,7,g+1); PROD(2,4,5,g+2); PROD(3,6,7,g+3);
        _tile_stored(0, buf[0], 64); _tile_stored(1, buf[1], 64); _tile_stored(2, buf[2], 64); _tile_stored(3, buf[3], 64);
        scale(acc, buf[0], g); scale(acc, buf[1], g+1); scale(acc, buf[2], g+2); scale(acc, buf[3], g+3);
      }
    }
  }
  double t=now()-t0; double prods = (double)reps*groups;
  float s=0; float tmp[16]; for(int i=0;i<16;i++){_mm512_storeu_ps(tmp,acc[i]); s+=tmp[0];}
  printf("mode %d: %.2f ns per group (%.0f GMAC/s) %g\n", mode, t/prods*1e9, 8192/(t/prods*1e9), s);
}
