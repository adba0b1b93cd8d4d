#!/usr/bin/env bash
# A first run of the verl recipe on one GPU: a tiny Qwen2.5-VL and a tiny CLIP made in code,
# 8 made-up questions, 2 training steps of run_qwen2_5_vl_mapo.sh with its batch sizes and
# lengths cut to fit (verl with its vLLM installed: see README.md). It checks that verl, vLLM,
# the zoom tool, the `mapo` reward manager and estimator work together, not that the policy
# learns (it is random).
#
#   bash examples/verl/smoke_1gpu.sh [WORKDIR]        (default runs/verl-smoke)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${1:-runs/verl-smoke}
shift || true

python3 "$HERE/make_smoke_assets.py" "$WORK"
python3 "$HERE/prepare_data.py" "$WORK/questions.jsonl" "$WORK/train.parquet" --val-fraction 0.25
bash "$HERE/run_qwen2_5_vl_mapo.sh" "$WORK/train.parquet" "$WORK/train_val.parquet" \
    "$WORK/model" "$WORK/clip" \
    trainer.n_gpus_per_node=1 \
    trainer.total_training_steps=2 \
    trainer.val_before_train=False \
    trainer.test_freq=-1 \
    trainer.save_freq=-1 \
    trainer.default_local_dir="$WORK/checkpoints" \
    data.train_batch_size=4 \
    data.val_batch_size=2 \
    data.max_prompt_length=512 \
    data.max_response_length=256 \
    actor_rollout_ref.actor.ppo_mini_batch_size=4 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1 \
    actor_rollout_ref.rollout.n=2 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.3 \
    actor_rollout_ref.rollout.multi_turn.max_assistant_turns=2 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1 \
    "$@"
