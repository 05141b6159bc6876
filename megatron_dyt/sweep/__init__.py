"""α₀ sweeps and studies: a grid spec expanded into training runs, run locally or as one SLURM job
array, and reported (`megatron-dyt sweep run / run-one / report`); one run's norm diagnostics
(`megatron-dyt report RUN`).

A top layer, like `launch`: it drives `megatron-dyt train` in child processes and reads what
the runs leave behind, so nothing below (config, model, data, training) imports it. Inside,
each module imports only those above it in this list, so there is no cycle:

    spec         the spec: axes (a study's parts), runs, their names and validated configs
    state        the sweep folder: plan, per-run status, locks, how a run ended
    stats        mean, spread, t-intervals, paired intervals, the optimum's set, the bootstrap,
                 the power-law fit
    diagnose     one run's norm statistics over training and its flagged layers
    runner       local execution: child processes, parallel runs, GPU blocks
    slurm_array  the job-array script, its submission and requeueing
    report       the CSV, Markdown, heat-maps and fit of a sweep folder
    study        a study's report: each question with its intervals and the published figure
    cli          `megatron-dyt sweep`: the only module that imports runner, slurm_array and
                 report together
"""
