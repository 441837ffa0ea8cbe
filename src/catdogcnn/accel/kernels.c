/* catdogcnn's CPU kernels (built and loaded by kernels.py): 2x2 max-pooling then ReLU, forward and backward, on
 * bf16 maps laid out (N, H, W, C), alone or after a 3x3 convolution of RGB photos (models/fused_pool.py); the
 * augmentation's affine warp (augment.py).
 *
 * bf16 values are read as int16 bits and compared as integers: bf16 is sign and magnitude, so flipping the
 * magnitude bits of the negative ones gives integers in the order of the numbers. The loops are branch-free
 * so that the compiler vectorizes them over channels. Threads come from torch's OpenMP runtime, which this
 * library shares (it is loaded after torch, and the loader resolves libgomp.so.1 to torch's copy).
 */
#include <stdint.h>
#include <string.h>

#define NO_GRADIENT 4 /* an output equal to 0 after the ReLU passes no gradient back */
#define ABOVE_ALL 0x7FFF /* NaN's key: above every number's (+inf is 0x7F80) */

void max_pool_relu_forward(const int16_t *x, int16_t *out, uint8_t *index, int n_images, int height, int width,
                           int channels) {
    const int out_h = height / 2, out_w = width / 2;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < n_images; n++) {
        for (int i = 0; i < out_h; i++) {
            const int16_t *top = x + (((int64_t)n * height + 2 * i) * width) * channels;
            const int16_t *bottom = top + (int64_t)width * channels;
            const int64_t row = ((int64_t)n * out_h + i) * out_w * channels;
            for (int j = 0; j < out_w; j++) {
                const int16_t *window[4] = {top + 2 * j * channels, top + (2 * j + 1) * channels,
                                            bottom + 2 * j * channels, bottom + (2 * j + 1) * channels};
                for (int c = 0; c < channels; c++) {
                    int16_t best = 0, bits = 0; /* starting from 0 is the ReLU */
                    uint8_t pick = NO_GRADIENT;
                    for (int k = 0; k < 4; k++) {
                        const int16_t s = window[k][c];
                        const int nan = (s & 0x7FFF) > 0x7F80;
                        const int16_t key = nan ? ABOVE_ALL : (int16_t)(s ^ ((s >> 15) & 0x7FFF));
                        const int take = nan | (key > best); /* numbers: the first maximum; NaN: the last NaN */
                        best = take ? key : best;
                        pick = take ? (uint8_t)k : pick;
                        bits = take ? s : bits;
                    }
                    out[row + j * channels + c] = bits;
                    index[row + j * channels + c] = pick;
                }
            }
        }
    }
}

void max_pool_relu_backward(const int16_t *grad_out, const uint8_t *index, int16_t *grad_in, int n_images,
                            int height, int width, int channels) {
    const int out_h = height / 2, out_w = width / 2;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < n_images; n++) {
        for (int i = 0; i < height; i++) {
            int16_t *target = grad_in + (((int64_t)n * height + i) * width) * channels;
            if (i / 2 >= out_h) { /* an odd last row is left out of the pooling */
                memset(target, 0, sizeof(int16_t) * width * channels);
                continue;
            }
            const int64_t row = ((int64_t)n * out_h + i / 2) * out_w * channels;
            for (int j = 0; j < width; j++) {
                int16_t *cell = target + (int64_t)j * channels;
                if (j / 2 >= out_w) {
                    memset(cell, 0, sizeof(int16_t) * channels);
                    continue;
                }
                const uint8_t k = (uint8_t)((i % 2) * 2 + j % 2);
                const int16_t *g = grad_out + row + (j / 2) * channels;
                const uint8_t *picked = index + row + (j / 2) * channels;
                for (int c = 0; c < channels; c++)
                    cell[c] = picked[c] == k ? g[c] : 0;
            }
        }
    }
}

/* Convolution 3x3 of RGB photos, 2x2 max-pool and ReLU in one pass, on CPUs with AVX-512 BF16 dot products.
 *
 * The photos are rounded to bf16 into planes [n][rgb][h][width + 2] and the weights into pairs, as the bf16
 * convolution under autocast rounds them (the bias stays fp32); each sum is accumulated in fp32 (vdpbf16ps: two
 * products per lane and instruction), the four of a pooling window compared in fp32, and only the result rounded
 * to bf16. A pair of
 * weights spans kw 0-1 or kw 2 and a 0 ("kw 3"), whose pixel is a real one or the planes' zero padding:
 * photos must be finite (0 x inf is NaN). The full-size convolution map is never written, nor read back.
 */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define RGB 3
#define PAIRS (RGB * 3 * 2) /* per output channel: (colour, kh, half) */
#define PIXELS 2            /* pooled outputs done together: 8 independent sums hide the dot product's latency */

int conv_pool_supported(void) { return 1; }

static inline uint16_t bf16_bits(float f) { /* rounded to nearest even, as torch rounds fp32 to bf16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((u >> 16) | 0x40); /* NaN stays a quiet NaN */
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static inline __attribute__((always_inline)) void pool_store(const __m512 *sums, uint16_t *out, uint8_t *index) {
    __m512 best = _mm512_setzero_ps(); /* starting from 0 is the ReLU */
    __m512i pick = _mm512_set1_epi32(NO_GRADIENT);
    for (int k = 0; k < 4; k++) { /* numbers: the first maximum; NaN: the last NaN */
        const __mmask16 take = _mm512_cmp_ps_mask(sums[k], sums[k], _CMP_UNORD_Q) |
                               _mm512_cmp_ps_mask(sums[k], best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, take, sums[k]);
        pick = _mm512_mask_mov_epi32(pick, take, _mm512_set1_epi32(k));
    }
    _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(best));
    _mm_storeu_si128((__m128i *)index, _mm512_cvtepi32_epi8(pick));
}

/* pixels pooled outputs (j, j+1, ...) of row i, 16 channels: the four window sums of each, pooled and stored. */
static inline __attribute__((always_inline)) void conv_pool_cells(const uint16_t *image, const __m512bh *w,
                                                                  __m512 bias, uint16_t *out, uint8_t *index,
                                                                  int i, int j, int height, int padded,
                                                                  int out_channels, const int pixels) {
    __m512 sums[4 * PIXELS];
    #pragma GCC unroll 8
    for (int k = 0; k < 4 * pixels; k++) sums[k] = bias;
    #pragma GCC unroll 18
    for (int p = 0; p < PAIRS; p++) {
        const uint16_t *at = image + ((int64_t)(p / 6) * height + 2 * i + (p / 2) % 3) * padded + 2 * j + 2 * (p % 2);
        #pragma GCC unroll 8
        for (int k = 0; k < 4 * pixels; k++) { /* k: pooled output k / 4, window cell (k % 4) / 2, k % 2 */
            int32_t pair;
            memcpy(&pair, at + 2 * (k / 4) + ((k % 4) / 2) * padded + k % 2, 4);
            sums[k] = _mm512_dpbf16_ps(sums[k], w[p], (__m512bh)_mm512_set1_epi32(pair));
        }
    }
    #pragma GCC unroll 4
    for (int q = 0; q < pixels; q++)
        pool_store(sums + 4 * q, out + (int64_t)q * out_channels, index + (int64_t)q * out_channels);
}

/* out and index (N, H', W', C), H' = (H - 2) / 2: ReLU(2x2 max-pool(conv3x3(x) + bias)) and which of the four
 * convolution outputs each came from. x: fp32 photos, any strides (in elements); planes: its bf16 copy, kept
 * for the backward pass. out_channels: a multiple of 16. */
void conv_pool_forward(const float *x, int64_t stride_n, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                       const float *weight, const float *bias, uint16_t *planes, uint16_t *out, uint8_t *index,
                       int n_images, int height, int width, int out_channels) {
    const int padded = width + 2, out_h = (height - 2) / 2, out_w = (width - 2) / 2;
    uint32_t pairs[PAIRS * out_channels]; /* [colour][kh][half][c] */
    for (int ci = 0; ci < RGB; ci++)
        for (int kh = 0; kh < 3; kh++)
            for (int c = 0; c < out_channels; c++) {
                const float *kernel_row = weight + ((c * RGB + ci) * 3 + kh) * 3;
                uint32_t *pair = pairs + ((ci * 3 + kh) * 2) * out_channels + c;
                pair[0] = bf16_bits(kernel_row[0]) | (uint32_t)bf16_bits(kernel_row[1]) << 16;
                pair[out_channels] = bf16_bits(kernel_row[2]);
            }
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int n = 0; n < n_images; n++)
            for (int c = 0; c < RGB; c++)
                for (int y = 0; y < height; y++) {
                    const float *source = x + n * stride_n + c * stride_c + y * stride_h;
                    uint16_t *target = planes + (((int64_t)n * RGB + c) * height + y) * padded;
                    for (int i = 0; i < width; i++) target[i] = bf16_bits(source[i * stride_w]);
                    target[width] = target[width + 1] = 0;
                }
        #pragma omp for schedule(static) collapse(2)
        for (int n = 0; n < n_images; n++)
            for (int i = 0; i < out_h; i++) {
                const uint16_t *image = planes + (int64_t)n * RGB * height * padded;
                const int64_t row = ((int64_t)n * out_h + i) * out_w * out_channels;
                for (int b = 0; b < out_channels; b += 16) {
                    __m512bh w[PAIRS]; /* this block's weights, held in registers along the row */
                    for (int p = 0; p < PAIRS; p++)
                        w[p] = (__m512bh)_mm512_loadu_si512(pairs + (int64_t)p * out_channels + b);
                    const __m512 bias16 = _mm512_loadu_ps(bias + b);
                    int j = 0;
                    for (; j + PIXELS <= out_w; j += PIXELS)
                        conv_pool_cells(image, w, bias16, out + row + (int64_t)j * out_channels + b,
                                        index + row + (int64_t)j * out_channels + b, i, j, height, padded,
                                        out_channels, PIXELS);
                    for (; j < out_w; j++)
                        conv_pool_cells(image, w, bias16, out + row + (int64_t)j * out_channels + b,
                                        index + row + (int64_t)j * out_channels + b, i, j, height, padded,
                                        out_channels, 1);
                }
            }
    }
}

/* Per-image gradients of the weights and bias, partial[n] = [colour][kh][kw][c] then the bias's [c]: each pooled
 * value's gradient goes to the one convolution output it came from, whose 3x3 inputs lie in the 4x4 patch under
 * the pooling window; a permute picks each channel's input from the patch. */
void conv_pool_backward(const uint16_t *planes, const uint16_t *grad_out, const uint8_t *index, float *partial,
                        int n_images, int height, int width, int out_channels) {
    const int padded = width + 2, out_h = (height - 2) / 2, out_w = (width - 2) / 2;
    const int per_image = (RGB * 9 + 1) * out_channels;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < n_images; n++) {
        float *sums = partial + (int64_t)n * per_image;
        const uint16_t *image = planes + (int64_t)n * RGB * height * padded;
        for (int b = 0; b < out_channels; b += 16)
            for (int ci = 0; ci < RGB; ci++) {
                __m512 acc[9], bias_acc = _mm512_setzero_ps();
                for (int k = 0; k < 9; k++) acc[k] = _mm512_setzero_ps();
                for (int i = 0; i < out_h; i++)
                    for (int j = 0; j < out_w; j++) {
                        const int64_t cell = (((int64_t)n * out_h + i) * out_w + j) * out_channels + b;
                        const __m512i pick = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(index + cell)));
                        const __mmask16 live = _mm512_cmpneq_epi32_mask(pick, _mm512_set1_epi32(NO_GRADIENT));
                        const __m512 g = _mm512_maskz_mov_ps(live, _mm512_castsi512_ps(_mm512_slli_epi32(
                            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(grad_out + cell))), 16)));
                        /* window cell k = 2 dy + dx starts at 4 dy + dx of the patch */
                        const __m512i corner = _mm512_maskz_add_epi32(
                            live, _mm512_slli_epi32(_mm512_srli_epi32(pick, 1), 2),
                            _mm512_and_si512(pick, _mm512_set1_epi32(1)));
                        const uint16_t *top = image + ((int64_t)ci * height + 2 * i) * padded + 2 * j;
                        int64_t rows[4];
                        for (int r = 0; r < 4; r++) memcpy(rows + r, top + r * padded, 8);
                        const __m512 patch = _mm512_castsi512_ps(_mm512_slli_epi32(
                            _mm512_cvtepu16_epi32(_mm256_set_epi64x(rows[3], rows[2], rows[1], rows[0])), 16));
                        #pragma GCC unroll 9
                        for (int k = 0; k < 9; k++) {
                            const __m512i at = _mm512_add_epi32(corner, _mm512_set1_epi32((k / 3) * 4 + k % 3));
                            acc[k] = _mm512_fmadd_ps(g, _mm512_permutexvar_ps(at, patch), acc[k]);
                        }
                        if (ci == 0) bias_acc = _mm512_add_ps(bias_acc, g);
                    }
                for (int k = 0; k < 9; k++) _mm512_storeu_ps(sums + (ci * 9 + k) * out_channels + b, acc[k]);
                if (ci == 0) _mm512_storeu_ps(sums + RGB * 9 * out_channels + b, bias_acc);
            }
    }
}
#else
int conv_pool_supported(void) { return 0; }
#endif

/* Affine warp with bilinear sampling, as F.grid_sample(x, F.affine_grid(theta, size, align_corners=False),
 * padding_mode="border", align_corners=False): theta[n] maps output coordinates in [-1, 1] to input ones.
 * x: fp32 (N, C, H, W) with any strides (in elements); out: fp32 laid out (N, H, W, C). One pass, no grid;
 * per row, where to sample is worked out for all pixels first (a loop the compiler vectorizes), then sampled. */
void warp_affine_bilinear(const float *x, int64_t stride_n, int64_t stride_c, int64_t stride_h, int64_t stride_w,
                          const float *theta, float *out, int n_images, int channels, int height, int width) {
    #pragma omp parallel
    {
        int column[width], row[width];
        float east[width], south[width];
        #pragma omp for schedule(static) collapse(2)
        for (int n = 0; n < n_images; n++)
            for (int i = 0; i < height; i++) {
                const float *t = theta + 6 * n, *image = x + n * stride_n;
                const float y = (2.0f * i + 1) / height - 1;
                const float row_x = t[1] * y + t[2], row_y = t[4] * y + t[5];
                #pragma omp simd /* without it gcc leaves the clamps below as branches and the loop scalar */
                for (int j = 0; j < width; j++) {
                    const float xn = (2.0f * j + 1) / width - 1;
                    /* input pixel coordinates, clamped to the border */
                    float ix = ((t[0] * xn + row_x + 1) * width - 1) / 2;
                    float iy = ((t[3] * xn + row_y + 1) * height - 1) / 2;
                    ix = ix > 0 ? ix : 0; /* not fminf: a libm call per pixel */
                    ix = ix < width - 1 ? ix : width - 1;
                    iy = iy > 0 ? iy : 0;
                    iy = iy < height - 1 ? iy : height - 1;
                    column[j] = (int)ix; /* floor: both are >= 0 */
                    row[j] = (int)iy;
                    east[j] = ix - column[j];
                    south[j] = iy - row[j];
                }
                float *target = out + (((int64_t)n * height + i) * width) * channels;
                for (int j = 0; j < width; j++) {
                    const float nw = (1 - east[j]) * (1 - south[j]), ne = east[j] * (1 - south[j]);
                    const float sw = (1 - east[j]) * south[j], se = east[j] * south[j];
                    const int64_t left = column[j] * stride_w, top = row[j] * stride_h;
                    const int64_t right = column[j] + 1 < width ? left + stride_w : left;
                    const int64_t bottom = row[j] + 1 < height ? top + stride_h : top;
                    const float *a = image + top + left, *b = image + top + right;
                    const float *c = image + bottom + left, *d = image + bottom + right;
                    for (int k = 0; k < channels; k++)
                        target[(int64_t)j * channels + k] = a[k * stride_c] * nw + b[k * stride_c] * ne +
                                                            c[k * stride_c] * sw + d[k * stride_c] * se;
                }
            }
    }
}
