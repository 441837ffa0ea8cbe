/* 2x2 max-pooling then ReLU, forward and backward, on bf16 maps laid out (N, H, W, C): see fused_pool.py.
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
