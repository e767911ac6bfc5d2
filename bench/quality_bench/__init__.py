"""Semi-supervised quality benchmark: does CMC beat plain supervised training?

    .venv/bin/python bench/quality.py [--quick] [--out bench/results/quality] [--steps N]
        [--seeds N] [--ratios 10,20,50,100] [--arms single,fusion,cmc,cmc-no-csc,cmc-no-cac]
        [--offsets 0,5,10,20] [--jobs 2] [--threads 1] [--train KEY=VALUE ...]
        [--resume-from FOLDER] [--config tiny|small|sam-med3d|RUN.yaml] [--difficulty hard]
    .venv/bin/python bench/quality.py --datalist 10=amos10.json --datalist 100=amos100.json
        [--config small] [--seeds N] [--steps N] ...

Data (generated with `write_synthetic_study`, one study per labelled ratio, same seed so the
images are identical and only the labelled split changes): CT and MR of *different* subjects
(`unpaired=True`, as in AMOS), misaligned, with a fixed validation and test split.
`--difficulty hard` generates `cmc synth --difficulty hard` studies instead of the easy
phantom: subjects, lesions and scanners that vary, and a CT/MR contrast gap, so that a few
labelled volumes cannot cover the variation (BENCHMARKS.md, its calibration).

Arms, all with the same steps and batch sizes (the budget), trained by
`cmc_train.trainer.train` and scored on the test split by `cmc_train.evaluate.evaluate` with
the final checkpoint (the LR decays to 0; the validation split is scored once, at the end, and
recorded: four validations per run cost as much as 60 training steps, 20 % of the budget):
  single      supervised, one modality (one branch, no fusion): two runs, one per modality
  fusion      supervised, both branches + fusion, no consistency losses
  cmc         CMC: CSC + CAC on the unlabelled data
  cmc-no-csc  CMC without CSC
  cmc-no-cac  CMC without CAC
and, as the floor of every ratio table, two reference arms that train nothing
(`quality_bench.floors`): multi-level intensity thresholds and a majority-vote atlas of the
labelled volumes; the report lists every trained arm that does not beat them.
A misalignment sweep at the lowest ratio trains `cmc` and `fusion` on *paired* studies whose
rigid offset between CT and MR is varied (rotation 0.75 deg per mm, no elastic field, so the
offset alone changes) and also scores the fused (CT + MR) prediction.

The lowest and the highest ratio (the two ends of the labelled-data gap) and the sweep are
repeated over `--seeds` training seeds (mean +- std); the other ratios use the first seed.
The report gives, per arm and modality, the share of supervised fusion's gap between the
lowest and the highest ratio that the arm closes at the lowest, with a paired bootstrap
interval over seeds and test cases (`quality_bench.gap`), and the sweep CMC's gain over
fusion at each offset with the same kind of interval; `bench/learning_curve.py` says
whether the steps were enough for the highest ratio to converge. Without `--steps`, the steps are chosen from the steps/s
measured here so the whole benchmark fits the budget (15 min `--quick`, 3 h full); the
estimate is printed before training starts, with a warning when the steps are fewer than
the study needs to converge (`plan.CONVERGED_STEPS`: 500 on the hard study, where the full
table of every arm and the sweep does not fit 3 h at that budget on 2 cores; `--arms
fusion,cmc --offsets '' --steps 500` does, in about 80 min). Writes to the output folder: results.md (tables
the plain list of where CMC does not beat `fusion`, and of trained arms below the floor),
quality_results.json (one row per run and mode: per-class test Dice), quality.png, results.json (every raw
number, the command and the wall time), data/ (studies) and runs/ (one folder per training
run, holding test_metrics.json once scored, which `--resume-from` uses to skip it).

`--train KEY=VALUE` changes one setting of `--config` (a loss weight, the consistency
schedule, the CSC temperature, the spacing; the keys of `cmc train --set`) for every arm: the investigations behind the
defaults of `cmc train` run through this same benchmark. Each run's config.yaml records the
settings, and a resumed run must use the same ones.

Real data: `--datalist RATIO=PATH`, once per labelled ratio, replaces the generated studies
with yours, e.g. AMOS imported at 10 % and 100 % with one seed (`cmc import amos ROOT
--labelled-ratio 0.1 --out amos10.json`), so every ratio has the same training, validation
and test cases (checked by id) and only the labels differ. Classes and modalities come from
the datalists. The sweep is skipped: real pairs carry no known offset to vary.
`--config` picks the model preset (sized to the data) or a run config YAML, as for `cmc
train`.

Modules: `plan` (arms, data studies, the run plan, the user's datalists), `runs` (one
training + scoring run, the worker processes, reuse of scored runs), `calibration` (steps
per second measured here, steps for the budget), `gap` (the share of the gap an arm
closes), `results` (statistics, results.md, quality.png) and `cli` (the command line,
`main`); `bench/quality.py` runs `cli.main`.
"""
