# Mutants of the tensor-core primitives' test kernels and of their emulation, for
# csrc/tests/mutation_check.sh (each must make robustft_mma_emulated_tests fail):
#   mutant NAME FILE SED_EXPRESSION TARGET [GROUPS...]
K=csrc/tests/cuda_emulation/mma_test_kernels.cuh
E=csrc/tests/cuda_emulation/emu_mma.h
T=robustft_mma_emulated_tests

# The 64 x 64 GEMM tile (cp.async pipeline + ldmatrix + mma): wrong fragment indices ...
mutant gemm_a_ldmatrix_row "$K" 's/\(lane & 15\);  \/\/ MUT:a_row/(lane \& 7);  \/\/ MUT:a_row/' $T mma_gemm
mutant gemm_b_fragment     "$K" 's/= r\[1\];  \/\/ MUT:b_frag/= r[2];  \/\/ MUT:b_frag/' $T mma_gemm
mutant gemm_c_fragment     "$K" 's/acc\[mi\]\[ni\]\[2 \* h \+ 1\];  \/\/ MUT:c_frag/acc[mi][ni][2 * h];  \/\/ MUT:c_frag/' $T mma_gemm
# ... and dropped synchronisation.
mutant gemm_no_sync_after_wait "$K" '/MUT:sync_after_wait/d' $T mma_gemm
mutant gemm_no_cp_async_wait   "$K" '/MUT:wait/d' $T mma_gemm
mutant gemm_no_sync_before_refill "$K" '/MUT:sync_before_refill/d' $T mma_gemm

# The emulation itself: a wrong fragment layout or visibility rule must fail its unit tests.
mutant emu_a16_layout   "$E" 's/row = \(i < 2 \|\| \(i >= 4 && i < 6\)\) \? g : g \+ 8;/row = i < 4 ? g : g + 8;/' $T mma_mma
mutant emu_b16_layout   "$E" 's/row = t \* 2 \+ \(i & 1u\) \+ \(i >= 2 \? 8 : 0\);/row = t * 2 + (i \& 1u) * 8 + (i >= 2 ? 1 : 0);/' $T mma_mma
mutant emu_c_layout     "$E" 's/col = t \* 2 \+ \(i & 1u\);/col = t * 2 + (i >> 1);/' $T mma_mma
mutant emu_tf32_a_layout "$E" 's/row = \(i == 0 \|\| i == 2\) \? g : g \+ 8;/row = i < 2 ? g : g + 8;/' $T mma_mma
mutant emu_ldmatrix_trans "$E" 's/rows\[m\]\[2 \* t\]\[g\]/rows[m][g][2 * t]/' $T mma_ldmatrix
mutant emu_wait_all_groups "$E" 's/const size_t done_groups = groups - pending_allowed;/const size_t done_groups = groups;/' $T mma_cp_async
