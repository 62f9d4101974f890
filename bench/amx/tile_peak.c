// The AMX int8 tile unit's peak on this CPU: four independent C tiles, `tdpbsud` back to back, K = 64 or 32 bytes
// per tile row. Needs Linux's tile-data permission (asked here), an AMX CPU and gcc 11 or later.
//   gcc -O2 -mamx-tile -mamx-int8 bench/amx/tile_peak.c -o /tmp/tile_peak && /tmp/tile_peak 64 && /tmp/tile_peak 32
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
int main(int argc,char**argv){
  syscall(SYS_arch_prctl, 0x1023, 18);
  int K = argc>1? atoi(argv[1]) : 64;
  cfg_t c; memset(&c,0,sizeof c); c.palette=1;
  for(int i=0;i<8;i++){c.colsb[i]=64;c.rows[i]=16;}
  c.colsb[4]=K; c.colsb[5]=K; c.rows[6]=K/4; c.rows[7]=K/4;
  _tile_loadconfig(&c);
  static int8_t a[16*64], b[16*64]; static int32_t d[16*16];
  _tile_loadd(4,a,64); _tile_loadd(5,a,64); _tile_loadd(6,b,64); _tile_loadd(7,b,64);
  _tile_zero(0);_tile_zero(1);_tile_zero(2);_tile_zero(3);
  long N=20000000; double t0=now();
  for(long i=0;i<N;i++){ _tile_dpbsud(0,4,6); _tile_dpbsud(1,4,7); _tile_dpbsud(2,5,6); _tile_dpbsud(3,5,7);}
  double t=now()-t0;
  _tile_stored(0,d,64);
  printf("K=%d: %.1f ns per tdp, %.1f GMAC/s (d0 %d)\n", K, t/(4.0*N)*1e9, 4.0*N*16*16*K/t/1e9, d[0]);
}
