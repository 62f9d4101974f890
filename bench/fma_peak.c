// f32 FMA peak of one thread: 12 independent chains of 512-bit (or 256-bit) fused multiply-adds,
// long enough to hide the FMA latency; the figure is FLOP per second of CPU time (2 per lane).
// The trainer's share of the machine (bench/train_vs_pytorch.sh) is given against it.
//
//   gcc -O3 -march=native bench/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double cpu_seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define CHAINS 12
#define ITERS 200000000L

#ifdef __AVX512F__
static double peak512(void) {
  __m512 acc[CHAINS];
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  double start = cpu_seconds();
  for (long n = 0; n < ITERS / CHAINS; n++)
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  double s = cpu_seconds() - start;
  float sink = 0;
  for (int i = 0; i < CHAINS; i++) sink += _mm512_reduce_add_ps(acc[i]);
  if (sink == 12345.0f) puts("");
  return (double)(ITERS / CHAINS) * CHAINS * 16 * 2 / s / 1e9;
}
#endif

static double peak256(void) {
  __m256 acc[CHAINS];
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  double start = cpu_seconds();
  for (long n = 0; n < ITERS / CHAINS; n++)
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  double s = cpu_seconds() - start;
  float out[8], sink = 0;
  for (int i = 0; i < CHAINS; i++) {
    _mm256_storeu_ps(out, acc[i]);
    for (int j = 0; j < 8; j++) sink += out[j];
  }
  if (sink == 12345.0f) puts("");
  return (double)(ITERS / CHAINS) * CHAINS * 8 * 2 / s / 1e9;
}

int main(void) {
#ifdef __AVX512F__
  printf("avx512 f32 FMA peak, one thread: %.1f GFLOP/s\n", peak512());
#endif
  printf("avx2 f32 FMA peak, one thread: %.1f GFLOP/s\n", peak256());
  return 0;
}
