# The mutants CI runs on every submission (tests/run_all.sh): one wrong fragment index and two
# dropped barriers of the fused CUDA kernels, a sample of mutations_kernels.sh (all 17 run in
# about 12 minutes on two cores; these three in about two).
MMA=csrc/cuda/mma_tile.cuh
EPI=csrc/cuda/tile_epilogue.cuh
C=robustft_cuda_emulated_tests
mutant mma_a_chunk            "$MMA" 's/a_chunk = lane >> 4;/a_chunk = (lane >> 4) ^ 1;/' $C mma_f16
mutant mma_no_sync_after_wait "$MMA" '/block kb visible to every warp/d' $C mma_f16
mutant epi_no_sync_col_states "$EPI" '/column states are in red/d' $C mma_f16
