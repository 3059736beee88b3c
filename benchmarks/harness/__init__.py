"""The loss benchmarks' shared machinery, one concern per module.

Its users: the one-script-per-loss entry points (bench_clip.py, bench_siglip.py, bench_m2mix.py,
bench_robust_step.py, through cli.py), cpu_compare.py (the providers, inputs, memory probe and
targets table) and cpu_report.py (cpu_compare.py's run, its tables and plots), and
gpu_bench.py, the benchmark stage of gpu_check.sh (measure.py in a long-lived worker).

  losses.py       the losses benchmarked, their settings, the dtypes and each call's inputs
  providers.py    what computes each loss (reference, reference+compile, native,
                  native-products, triton, open_clip, inf_cl, native-separate, floor), the step
                  design each fused provider pins, and why one is skipped here
  floor.py        the floor provider: only the library GEMMs an exact evaluation needs
  memory.py       the peak-memory probe (CUDA allocator; CPU resident set)
  timing.py       the modes, the timing policy, one mode's timed calls
  measure.py      every mode of one (loss, provider, N, D, dtype), a row per mode, never raising
  isolation.py    measure.py in other processes: a fresh one per configuration, or a
                  long-lived worker watched with a time-out
  environment.py  the device's name, the library versions, UTC time stamps
  results.py      the CSV columns, where a run's rows and plots go
  tables.py       the console tables: every row, and each provider's time over the floor's
  targets.py      the CPU targets table of cpu_compare.py / cpu_report.py: each step design's
                  time over fused CLIP and over the floor, beside the targets
  cli.py          the command line of the bench_*.py scripts and the sweep it runs

benchmarks/ must be on sys.path (each script puts it there): the modules import each other as
`harness.<module>` and results.py imports plot.py.
"""
