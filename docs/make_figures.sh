#!/usr/bin/env bash
# Rebuild the README's figures from scratch (2-core CPU: about 3 hours, mostly the d_model-512/510 runs and the sweeps):
#   bash docs/make_figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=docs/figures
mkdir -p "$out"

# 1. Nanda's 5-digit run, three seeds trained as one stacked ensemble, and its report.
$py -m addrepro.train -m experiment=nanda_5digit seed=0,1,2 hydra/launcher=ensemble \
    trainer.progress_bar=false hydra.sweep.dir=outputs/docs/nanda
cp outputs/docs/nanda/0_seed=0/place_loss.png "$out/nanda_place_loss_seed0.png"
cp outputs/docs/nanda/0_seed=0/naive_sum.png "$out/nanda_naive_sum_seed0.png"
cp outputs/docs/nanda/0_seed=0/carry_conditioned.png "$out/nanda_carry_conditioned_seed0.png"
$py docs/compare_seeds.py outputs/docs/nanda/0_seed=0 outputs/docs/nanda/1_seed=1 outputs/docs/nanda/2_seed=2   # the README table

# 2. A small 2-layer model on 3-digit addition with log-spaced checkpoints, for the analyses.
$py -m addrepro.train data.n_digits=3 model.depth=2 model.width=64 optimizer.lr=3e-3 \
    trainer.max_steps=2000 trainer.ckpt_schedule=log trainer.ckpt_log_count=12 \
    trainer.progress_bar=false logger=csv hydra.run.dir=outputs/docs/small
for a in ablation logit_attribution attention composition; do
  $py -m addrepro.analyze checkpoint=outputs/docs/small analysis=$a
  cp outputs/docs/small/analysis/${a}_last.png "$out/analysis_${a}.png"
done
$py -m addrepro.analyze checkpoint=outputs/docs/small analysis=over_training of=attention
cp outputs/docs/small/analysis/over_training_attention.png "$out/analysis_over_training_attention.png"

# 3. The Quirke & Barez preset (their notebook's 5000 steps, ~15 minutes), for its carry classes.
$py -m addrepro.train experiment=quirke_5digit trainer.progress_bar=false hydra.run.dir=outputs/docs/quirke
cp outputs/docs/quirke/place_loss.png "$out/quirke_place_loss.png"

# 4. The Findings: a base x digit-count sweep, 5 seeds each (12 stacks of 5, ~80 minutes with one thread),
#    and 5 seeds each of LSB order and of the digitwise task (~25 minutes).
$py -m addrepro.train -m data.base=4,6,8,10 data.n_digits=3,4,5 seed=0,1,2,3,4 hydra/launcher=ensemble \
    logger=csv trainer.threads=1 trainer.progress_bar=false hydra.sweep.dir=outputs/docs/base_digits
$py -m addrepro.report outputs/docs/base_digits
cp outputs/docs/base_digits/sweep_descent.png "$out/findings_descent_base_digits.png"
cp outputs/docs/base_digits/sweep_place_loss.png "$out/findings_place_loss_base_digits.png"
$py -m addrepro.train -m data.order=lsb seed=0,1,2,3,4 hydra/launcher=ensemble logger=csv trainer.threads=1 \
    trainer.progress_bar=false hydra.sweep.dir=outputs/docs/lsb
cp outputs/docs/lsb/0_seed=0/timeline.png "$out/findings_lsb_timeline_seed0.png"
$py -m addrepro.analyze checkpoint=outputs/docs/lsb/0_seed=0 analysis=spikes
cp "outputs/docs/lsb/0_seed=0/analysis/spike_windows.png" "$out/findings_spike_window_lsb_seed0.png"
$py -m addrepro.train -m data.task=digitwise seed=0,1,2,3,4 hydra/launcher=ensemble logger=csv trainer.threads=1 \
    trainer.progress_bar=false hydra.sweep.dir=outputs/docs/digitwise
cp outputs/docs/digitwise/0_seed=0/timeline.png "$out/findings_digitwise_timeline_seed0.png"

# 5. Nanda's preset to step 1400, for the breakdown table, the neuron shares and the conditioning figure.
$py -m addrepro.train experiment=nanda_5digit trainer.max_steps=1400 trainer.threads=1 trainer.progress_bar=false \
    hydra.run.dir=outputs/docs/nanda1400
$py -m addrepro.analyze checkpoint=outputs/docs/nanda1400/checkpoints/last.ckpt analysis=breakdown
cp outputs/docs/nanda1400/analysis/breakdown_last.png "$out/nanda_breakdown_step1400.png"
$py -m addrepro.analyze checkpoint=outputs/docs/nanda1400/checkpoints/last.ckpt analysis=neurons
for step in 653 956 1400; do
  $py -m addrepro.analyze checkpoint=outputs/docs/nanda1400/checkpoints/weights_$step.ckpt analysis=condition \
      "condition.by=[a_3]"
done
cp outputs/docs/nanda1400/analysis/condition_weights_1400.png "$out/findings_odds_place4_step1400.png"

# 6. The default model, three seeds, and its local learning coefficient over training (~20 minutes a seed).
$py -m addrepro.train -m seed=0,1,2 hydra/launcher=ensemble logger=csv trainer.threads=1 trainer.progress_bar=false \
    hydra.sweep.dir=outputs/docs/default3
for s in 0 1 2; do
  extra=(); [ "$s" = 0 ] && extra=(llc.sweep=true)
  $py -m addrepro.analyze checkpoint=outputs/docs/default3/${s}_seed=${s} analysis=llc llc.draws=150 "${extra[@]}"
done
$py -m addrepro.analyze checkpoint=outputs/docs/default3/0_seed=0 analysis=llc llc.draws=150 llc.gamma=1000 \
    "llc.steps=[0,13,103,365,556,930,1000,2000,3000]" out_dir=outputs/docs/default3/llc_gamma1000
cp "outputs/docs/default3/0_seed=0/analysis/llc.png" "$out/findings_llc_default_seed0.png"
