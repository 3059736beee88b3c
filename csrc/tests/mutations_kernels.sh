# Mutants of the fused CUDA kernels themselves (the tile engines, the thread-to-tile layout
# and the epilogues), for csrc/tests/mutation_check.sh: each must make the emulated kernel
# tests fail.
#   mutant NAME FILE SED_EXPRESSION TARGET [GROUPS...]
MMA=csrc/cuda/mma_tile.cuh
FFMA=csrc/cuda/ffma_tile.cuh
LAYOUT=csrc/cuda/tile_layout.cuh
EPI=csrc/cuda/tile_epilogue.cuh
STEP=csrc/cuda/step_device.cuh
C=robustft_cuda_emulated_tests
S=robustft_step_emulated_tests

# Tensor-core engine: wrong fragment addresses or accumulator order ...
mutant mma_a_row      "$MMA" 's/\+ \(lane & 15\), a_chunk/+ (lane \& 7), a_chunk/' $C mma_bf16
mutant mma_a_chunk    "$MMA" 's/a_chunk = lane >> 4;/a_chunk = (lane >> 4) ^ 1;/' $C mma_f16
mutant mma_b_row      "$MMA" 's/ \+ \(\(lane >> 4\) << 3\);/;/' $C mma_bf16
mutant mma_b_chunk    "$MMA" 's/b_chunk = \(lane >> 3\) & 1;/b_chunk = (lane >> 4) \& 1;/' $C mma_tf32
mutant mma_acc_order  "$MMA" 's/\{acc\[k\]\[r\]\[c\], acc\[k\]\[r\]\[c \+ 1\], acc\[k\]\[r \+ 1\]\[c\]/{acc[k][r][c], acc[k][r + 1][c], acc[k][r][c + 1]/' $C mma_bf16
mutant mma_tf32_unrounded "$MMA" 's/r\[i\] = ptx::to_tf32\(__uint_as_float\(r\[i\]\)\);/(void)r;/' $C mma_tf32
# ... and dropped or weakened synchronisation of the cp.async pipeline.
mutant mma_no_sync_after_wait "$MMA" '/block kb visible to every warp/d' $C mma_bf16
mutant mma_no_sync_at_tile_start "$MMA" '/no thread still reads the stages/d' $C mma_bf16
mutant mma_wait_one_too_few "$MMA" 's/cp_async_wait<STAGES - 2>/cp_async_wait<STAGES - 1>/' $C mma_bf16
# CUDA-core engine.
mutant ffma_no_sync_slabs "$FFMA" '/the slabs are complete/d' $C ffma_float
# Layout: the thread-to-tile map of the mma accumulators, and a lane reduction.
mutant layout_row_half  "$LAYOUT" 's/\+ 8 \* \(r % 2\); \}/+ 8 * ((r + 1) % 2); }/' $C mma_bf16
mutant layout_col_pair  "$LAYOUT" 's/\+ 2 \* \(lane\(\) & 3\) \+ \(c % 2\); \}/+ 2 * (lane() \& 3); }/' $C mma_bf16
mutant layout_row_lanes "$LAYOUT" 's/return op\(v, shfl_xor\(v, 2\)\);/return v;/' $C mma_f16
# Epilogues: dropped barriers of the cross-warp reductions.
mutant epi_no_sync_row_states "$EPI" '/partial row states are in red/d' $C mma_bf16
mutant epi_no_sync_col_states "$EPI" '/column states are in red/d' $C mma_bf16
mutant epi_no_sync_block_sum  "$EPI" '/sum is in red/d' $C mma_bf16
# Step kernels: a wrong operand of the B = T M^T tile product.
mutant step_pair_rows "$STEP" 's/return k == 1 \? 1 : 0;/return k == 2 ? 1 : 0;/' $S step_mma_bf16
