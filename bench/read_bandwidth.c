// Read-only memory bandwidth, the roof of decoding (which only reads weights): each OpenMP thread sums its slice
// of a 4 GiB array with AVX-512 loads (AVX loads where the compiler targets no AVX-512); best of 8 passes. STREAM triad also writes, so it understates this roof.
// Build and run: gcc -O3 -march=native -fopenmp bench/read_bandwidth.c -o /tmp/read_bandwidth &&
//   for t in 1 2; do OMP_NUM_THREADS=$t /tmp/read_bandwidth; done
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#define VEC __m512
#define LANES 16
#define ZERO _mm512_setzero_ps
#define ADD _mm512_add_ps
#define LOAD _mm512_load_ps
#define SUM _mm512_reduce_add_ps
#else
#define VEC __m256
#define LANES 8
#define ZERO _mm256_setzero_ps
#define ADD _mm256_add_ps
#define LOAD _mm256_load_ps
static float SUM(__m256 v) {
  float f[8];
  _mm256_storeu_ps(f, v);
  return f[0] + f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7];
}
#endif
int main(int argc, char **argv) {
  size_t bytes = (size_t)4 << 30;
  int reps = 8;
  float *a = aligned_alloc(64, bytes);
  memset(a, 1, bytes);
  size_t n = bytes / 4;
  double best = 1e9;
  float sink = 0;
  for (int r = 0; r < reps; r++) {
    double t0 = omp_get_wtime();
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
      int t = omp_get_thread_num(), nt = omp_get_num_threads();
      size_t lo = n / nt * t, hi = n / nt * (t + 1);
      VEC s0 = ZERO(), s1 = s0, s2 = s0, s3 = s0;
      for (size_t i = lo; i < hi; i += 4 * LANES) {
        s0 = ADD(s0, LOAD(a + i));
        s1 = ADD(s1, LOAD(a + i + LANES));
        s2 = ADD(s2, LOAD(a + i + 2 * LANES));
        s3 = ADD(s3, LOAD(a + i + 3 * LANES));
      }
      total += SUM(ADD(ADD(s0, s1), ADD(s2, s3)));
    }
    double dt = omp_get_wtime() - t0;
    if (dt < best) best = dt;
    sink += total;
  }
  printf("threads %d: read %.1f GB/s (best of %d over %zu MB) %g\n", omp_get_max_threads(), bytes / best / 1e9, reps, bytes >> 20, sink);
}
