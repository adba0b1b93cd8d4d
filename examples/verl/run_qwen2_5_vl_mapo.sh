#!/usr/bin/env bash
# MAPO on verl 0.9.1's default trainer: Qwen2.5-VL, multi-turn rollout with the zoom tool,
# the `mapo` reward manager (outcome + each description scored against its crop) and the
# `mapo` advantage estimator. verl starts its trainer and workers as Ray processes: the two
# variables below make every one of them import mapo_fast.integrations.verl_worker; they are
# exported for this shell and passed in Ray's runtime_env, which reaches every worker on every
# node of the cluster.
#
#   bash examples/verl/run_qwen2_5_vl_mapo.sh TRAIN.parquet VAL.parquet /path/to/Qwen2.5-VL \
#       /path/to/clip [more hydra overrides]
#
# Data: verl's RL dataset parquet (prompt with an <image> placeholder, images, data_source,
# reward_model.ground_truth): `prepare_data.py` writes it from images and questions, with the
# resize bounds that keep verl's image loading in the zoom tool's frame.
set -euo pipefail
TRAIN=$1 VAL=$2 MODEL=$3 CLIP=$4
shift 4
HERE=$(cd "$(dirname "$0")" && pwd)

export VERL_USE_EXTERNAL_MODULES=mapo_fast.integrations.verl_worker
export MAPO_FAST_VERL_OPTIONS="{\"semantic_coef\": 1.0, \"reward\": {\"verifier\": \"$CLIP\", \"min_pixels\": 3136, \"max_pixels\": 1003520}}"

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=mapo \
    algorithm.norm_adv_by_std_in_grpo=True \
    algorithm.use_kl_in_reward=False \
    data.train_files="$TRAIN" \
    data.val_files="$VAL" \
    data.train_batch_size=64 \
    data.max_prompt_length=4096 \
    data.max_response_length=4096 \
    data.image_key=images \
    data.return_raw_chat=True \
    data.filter_overlong_prompts=True \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_fused_kernels=True \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=32 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2 \
    actor_rollout_ref.actor.use_kl_loss=True \
    actor_rollout_ref.actor.kl_loss_coef=0.01 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.multi_turn.enable=True \
    actor_rollout_ref.rollout.multi_turn.max_assistant_turns=5 \
    actor_rollout_ref.rollout.multi_turn.tool_config_path="$HERE/zoom_tool.yaml" \
    actor_rollout_ref.rollout.agent.default_agent_loop=tool_agent \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4 \
    reward.reward_manager.name=mapo \
    trainer.logger='["console"]' \
    trainer.project_name=mapo_fast \
    trainer.experiment_name=qwen2_5_vl_mapo \
    trainer.n_gpus_per_node=8 \
    trainer.nnodes=1 \
    trainer.total_epochs=1 \
    +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES="$VERL_USE_EXTERNAL_MODULES" \
    "+ray_kwargs.ray_init.runtime_env.env_vars.MAPO_FAST_VERL_OPTIONS='$MAPO_FAST_VERL_OPTIONS'" \
    "$@"
