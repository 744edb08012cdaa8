"""`make mutants`: does the test suite see wrong maths? Each mutant below is a plausible mistake (a
dropped term, a flipped sign, a missing stop-gradient, a broken batch split); the script applies it
to a copy of the tree, runs the tests that should see it, and reports which mutants survive.

    python scripts/mutants.py              # all of them
    python scripts/mutants.py meanflow     # those whose name contains "meanflow"

Exit status 1 if any mutant survives, or if the chosen tests fail on the unmutated tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATHS = "tests/test_method_maths.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str  # must occur exactly once in `path`
    mutated: str
    tests: tuple[str, ...]  # the pytest ids that should fail


MUTANTS = [
    Mutant("freeflow: correction term dropped", "distill/freeflow.py",
           "target_N = lam * delta_N", "target_N = 0 * lam * delta_N",
           (f"{MATHS}::test_freeflow_correction_moves_a_biased_prediction_towards_the_teacher",)),
    Mutant("freeflow: prediction error sign flipped", "distill/freeflow.py",
           "err = v_G - u", "err = u - v_G",
           ("tests/test_methods.py::test_method_matches_the_teacher_in_one_step[freeflow]",)),
    Mutant("meanflow: stop-gradient on dF/dt removed", "distill/meanflow.py",
           "return F, dF.detach()", "return F, dF",
           (f"{MATHS}::test_meanflow_gradient_treats_the_target_as_a_constant",)),
    Mutant("meanflow: target sign flipped", "distill/meanflow.py",
           "target = velocity_target - bcast(t - s, x_t) * dF_dt",
           "target = velocity_target + bcast(t - s, x_t) * dF_dt",
           (f"{MATHS}::test_meanflow_gradient_treats_the_target_as_a_constant",)),
    Mutant("meanflow: JVP tangent of t dropped", "distill/meanflow.py",
           "(direction, torch.ones_like(t))", "(direction, torch.zeros_like(t))",
           (f"{MATHS}::test_meanflow_jvp_and_finite_differences_agree",)),
    Mutant("guidance: formula around the conditional", "distill/flow.py",
           "return uncond + scale * (cond - uncond)", "return cond + scale * (cond - uncond)",
           ("tests/test_flow.py::test_guidance_w1_is_conditional_and_interval_switches_it_off",)),
    Mutant("flow map: jump sign flipped", "distill/flow.py",
           "return x - bcast(t - s, x) * average_velocity(x, t, s, *cond)",
           "return x + bcast(t - s, x) * average_velocity(x, t, s, *cond)",
           ("tests/test_flow.py::test_student_starts_as_the_teacher",)),
    Mutant("attention: heads merged without moving them back beside each token", "distill/nets.py",
           "out = out.transpose(1, 2).reshape(batch, tokens, width)", "out = out.reshape(batch, tokens, width)",
           ("tests/test_sit.py::test_a_public_checkpoint_loads_into_our_convention",)),
    Mutant("jvp: attention allowed its fused kernel, which has no forward-mode derivative", "distill/flow.py",
           "sdpa_kernel(SDPBackend.MATH)", "sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])",
           ("tests/test_flow.py::test_finite_difference_and_jvp_agree",)),
    Mutant("torch backend: a compile cache folder yields to one set before", "server/torch_engine.py",
           'os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(options.compile_cache).resolve())',
           'os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(options.compile_cache).resolve()))',
           ("tests/test_torch_backend.py::test_compiled_buckets_match_eager_and_a_restart_loads_them_from_the_cache",)),
    Mutant("GPU bench: a resumed served figure kept for another bundle", "flowmap/bench_gpu.py",
           'and (part != "served" or served_as(earlier["config"]) == served_as(asdict(config)))}', "}",
           ("tests/test_bench_gpu.py::test_a_resumed_report_keeps_a_served_figure_only_for_the_same_bundle_and_load",)),
    Mutant("sit: output sign not flipped to our convention", "distill/nets.py",
           "return -self._dit(x, cond)", "return self._dit(x, cond)",
           ("tests/test_sit.py::test_a_public_checkpoint_loads_into_our_convention",)),
    Mutant("sit: time not reversed", "distill/nets.py",
           "self.t_embed(1 - t if self.config.arch == \"sit\" else t)", "self.t_embed(t)",
           ("tests/test_sit.py::test_a_public_checkpoint_loads_into_our_convention",)),
    Mutant("decoder: latent scaled the wrong way", "export/decoder.py",
           "latent / self.scale + self.shift", "latent * self.scale + self.shift",
           ("tests/test_latent.py::test_decoder_exports_with_its_scaling_baked_and_matches_torch",)),
    Mutant("decoder: the exporter's optimizer drops SANA's `+ eps` (NaN)", "export/decoder.py",
           "onnx_optimize = False", "onnx_optimize = True",
           ("tests/test_latent.py::test_decoder_exports_with_its_scaling_baked_and_matches_torch",)),
    Mutant("bundle: external weights not hash-checked", "export/bundle.py",
           "_resolve(root, entry.data, f\"{where}.data\", verify).path",
           "_resolve(root, entry.data, where, False).path",
           ("tests/test_latent.py::test_graphs_with_external_weights_are_listed_checked_and_served_alike",)),
    Mutant("diffusers: SD3 timestep not scaled to 1000", "distill/diffusers_models.py",
           'Family("sd3", "SD3Transformer2DModel", 1000.0', 'Family("sd3", "SD3Transformer2DModel", 1.0',
           ("tests/test_diffusers.py::test_the_teacher_follows_the_diffusers_pipeline[sd3]",)),
    Mutant("diffusers: FLUX 2x2 patches packed in the wrong order", "distill/diffusers_models.py",
           ".permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)",
           ".permute(0, 2, 4, 1, 5, 3).reshape(b, h * w // 4, c * 4)",
           ("tests/test_diffusers.py::test_the_teacher_follows_the_diffusers_pipeline[flux]",)),
    Mutant("text: SD3's two CLIPs side by side in the wrong order", "distill/text.py",
           "[out_l.hidden_states[-2], out_g.hidden_states[-2]]", "[out_g.hidden_states[-2], out_l.hidden_states[-2]]",
           ("tests/test_diffusers.py::test_the_teacher_follows_the_diffusers_pipeline[sd3]",)),
    Mutant("text: SANA's attention mask dropped", "distill/diffusers_models.py",
           "encoder_attention_mask=mask, return_dict=False", "encoder_attention_mask=None, return_dict=False",
           ("tests/test_diffusers.py::test_the_teacher_follows_the_diffusers_pipeline[sana]",)),
    Mutant("diffusers student: guidance embedding not added", "distill/diffusers_models.py",
           'self._extra = self.extra_embed["w"](guidance_input(w))',
           'self._extra = 0 * self.extra_embed["w"](guidance_input(w))',
           ("tests/test_diffusers.py::test_a_student_starts_as_the_teachers_euler_step[sd3]",)),
    Mutant("text teacher: the request's negative prompt ignored", "export/onnx_export.py",
           "label, self.guidance_scale, negative, self.t_lo",
           "label, self.guidance_scale, null_condition(self.teacher, label), self.t_lo",
           ("tests/test_text_serving.py::test_the_teacher_takes_a_negative_prompt",)),
    Mutant("shapes: the caption's second object drawn in the first's place", "distill/shapes.py",
           'return arrangement, (first, second) if self.relation in ("left of", "above") else (second, first)',
           "return arrangement, (first, second)",
           ("tests/test_shapes.py::test_the_caption_says_where_each_object_is",)),
    Mutant("oracle: spatial judged without the arrangement", "distill/oracle.py",
           'out["spatial"][i] = predicted["arrangement"][i] == truth["arrangement"][i] and same["colour"]',
           'out["spatial"][i] = same["colour"]',
           ("tests/test_shapes.py::test_the_oracle_reads_real_renders[test]",)),
    Mutant("clip: each image matched with the next caption", "distill/clip.py",
           "target = torch.arange(len(images))", "target = torch.arange(len(images)).roll(1)",
           ("tests/test_clip.py::test_the_loss_pulls_matching_pairs_together",)),
    Mutant("teacher: flow-matching target reversed", "distill/teacher.py",
           "t), t, label), eps - x)", "t), t, label), x - eps)",
           ("tests/test_distill_toy.py::test_teacher_learns_the_toy",)),
    Mutant("dmd: gradient direction flipped", "distill/losses.py",
           "grad = (denoised_fake - denoised_real)", "grad = (denoised_real - denoised_fake)",
           (f"{MATHS}::test_dmd_gradient_moves_samples_from_fake_towards_real",)),
    Mutant("dmd: stop-gradient on the target removed", "distill/losses.py",
           "(x0 - (x0 - grad).detach())", "(x0 - (x0 - grad))",
           (f"{MATHS}::test_dmd_gradient_moves_samples_from_fake_towards_real",)),
    Mutant("fgm: online flow not frozen in the generator loss", "distill/fgm.py",
           "fake.requires_grad_(False)  # ψ", "fake.requires_grad_(True)  # ψ",
           (f"{MATHS}::test_fgm_generator_gradient_reaches_the_generator_only",)),
    Mutant("ema: decay used as the step", "distill/trainer.py",
           "ema_p.lerp_(p, 1 - decay)", "ema_p.lerp_(p, decay)",
           (f"{MATHS}::test_ema_update_moves_a_fraction_one_minus_decay",)),
    Mutant("noise: seed off by one", "server/noise.py",
           "np.random.PCG64(seed)", "np.random.PCG64(seed + 1)",
           ("tests/test_batcher.py::test_noise_follows_the_documented_recipe",)),
    Mutant("batcher: every request gets the first rows back", "server/batcher.py",
           "set_result(output[offset:offset + item.rows])", "set_result(output[:item.rows])",
           ("tests/test_batcher.py::test_requests_share_a_batch_and_each_gets_its_own_rows_back",)),
    Mutant("batcher: rows leave in arrival order, not by deadline", "server/batcher.py",
           "heapq.heappush(self._items, (deadline, next(self._arrivals), item))",
           "heapq.heappush(self._items, (now, next(self._arrivals), item))",
           ("tests/test_batcher.py::test_rows_leave_earliest_deadline_first",)),
    Mutant("data: an image folder with colour read in grey", "distill/data.py",
           "channels = 3 if colour else 1", "channels = 1",
           ("tests/test_data.py::test_an_image_folder_with_colour_is_read_in_rgb_and_keeps_its_colours",)),
    Mutant("labels: any Unicode digit taken for a class index", "server/service.py",
           "if text.isascii() and text.isdigit()", "if text.isdigit()",
           ("tests/test_server.py::test_bad_input_gets_a_clear_4xx",)),
    Mutant("guidance: NaN passes the teacher's check", "server/service.py",
           "not abs(guidance - scale) <= 1e-6", "abs(guidance - scale) > 1e-6",
           ("tests/test_server.py::test_nan_guidance_is_refused_for_the_teacher_as_for_the_student",)),
    Mutant("export: a guidance scale outside the distilled range baked", "export/writer.py",
           "if not low - 1e-6 <= scale <= high + 1e-6]", "if not low - 1e-6 <= scale]",
           ("tests/test_export.py::test_a_scale_the_student_was_not_distilled_at_is_refused_before_any_export",)),
    Mutant("ray decoder: batches from Ray's threads run at once", "server/ray_app.py",
           "with self._one_at_a_time:", "if True:",
           ("tests/test_ray_latent.py::test_the_decoder_deployment_runs_one_padded_batch_at_a_time",)),
    Mutant("ray decoder: the bucket's padding left in the answer", "server/ray_app.py",
           "padded_size(rows, self.engine.buckets))})[:rows]", "padded_size(rows, self.engine.buckets))})",
           ("tests/test_ray_latent.py::test_the_decoder_deployment_runs_one_padded_batch_at_a_time",)),
    Mutant("admission: a request's encoding left out of its time behind the backlog", "server/admission.py",
           "estimate = SAFETY * (max(engines, encoders) + host_s)",
           "estimate = SAFETY * max(engines, encoders)",
           ("tests/test_admission.py::test_encoding_counts_in_a_requests_time_alone_and_behind_the_backlog",)),
    Mutant("encoding: a job timed per job, not per image", "server/encoding.py",
           "seconds / max(len(images), 1)", "seconds",
           ("tests/test_encoding.py::test_an_encoding_job_is_timed_by_its_kind_for_admission",)),
    Mutant("batcher: a bucket split made whatever it costs", "server/batcher.py",
           "return count if split < self.cost.seconds(padded_size(rows, buckets)) else len(batch)",
           "return count",
           ("tests/test_batcher.py::test_a_split_that_costs_more_than_the_padding_is_not_made",)),
    Mutant("batcher: rows held back by a split are dropped", "server/batcher.py",
           "                heapq.heappush(self._items, entry)\n", "",
           ("tests/test_batcher.py::test_rows_that_would_pad_far_run_as_the_bucket_below_and_the_rest_next",)),
    Mutant("batcher: a split's first batch padded as if it held every row", "server/batcher.py",
           "                rows -= entry[2].rows\n", "",
           ("tests/test_batcher.py::test_rows_that_would_pad_far_run_as_the_bucket_below_and_the_rest_next",)),
    Mutant("batcher: a request's tensor rows joined on the host", "server/batcher.py",
           "else join_rows(parts)", "else np.concatenate(parts)",
           ("tests/test_batcher.py::test_a_large_request_to_an_engine_answering_tensors_is_joined_as_a_tensor",)),
    Mutant("encoding: nvJPEG's side judged before upscaling", "server/encoding.py",
           "side = max(shape[1:]) * output.upscale", "side = max(shape[1:])",
           ("tests/test_encoding.py::test_images_below_the_gpu_jpeg_side_are_encoded_on_the_cpu_and_each_encoder_"
            "counts_its_images",)),
    Mutant("encoding: images below nvJPEG's side still go to the GPU", "server/encoding.py",
           "and side >= self.gpu_jpeg_min_side", "",
           ("tests/test_encoding.py::test_images_below_the_gpu_jpeg_side_are_encoded_on_the_cpu_and_each_encoder_"
            "counts_its_images",)),
    Mutant("search: the scored candidates left on the decoder's device", "server/stages.py",
           "state.x = images = np.clip(", "images = np.clip(",
           ("tests/test_torch_backend.py::test_a_search_scores_a_host_copy_that_replaces_the_device_candidates",)),
    Mutant("prompt cache: keeps a view of the text encoder's batch", "server/prompts.py",
           "self.cache[prompt] = condition.copy()", "self.cache[prompt] = condition",
           ("tests/test_text_serving.py::test_the_prompt_cache_keeps_its_own_copy_of_each_condition",)),
    Mutant("admission: rows not reserved", "server/admission.py",
           "load.rows += need.rows", "load.rows += 0",
           ("tests/test_admission.py::test_rows_stay_reserved_until_the_request_ends",)),
    Mutant("admission: rows not freed at release", "server/admission.py",
           "load.rows -= need.rows", "load.rows -= 0",
           ("tests/test_admission.py::test_rows_stay_reserved_until_the_request_ends",)),
    Mutant("admission: newcomers overtake the line", "server/admission.py",
           "if not line and self._fits(needs):", "if self._fits(needs):",
           ("tests/test_admission.py::test_a_small_newcomer_does_not_overtake_a_waiting_request",)),
    Mutant("admission: the backlog ahead ignored", "server/admission.py",
           "return max(self.seconds_alone(need), (self.backlog + need.work) * self.cost.seconds_per_row())",
           "return self.seconds_alone(need)",
           ("tests/test_admission.py::test_a_backlog_that_would_miss_the_deadline_is_429_and_admitted_work_is_kept",
            "tests/test_server.py::test_concurrent_teacher_requests_are_admitted_only_if_they_can_finish")),
    Mutant("gpu goals: hand-captured graphs of eager kernels count as compiled", "flowmap/gpu_report.py",
           'if MODES.get(mode, {}).get("compile") and MODES[mode].get("cuda_graphs")]',
           'if MODES.get(mode, {}).get("cuda_graphs")]',
           ("tests/test_bench_gpu.py::test_the_goals_judge_compiled_cuda_graphs_by_their_faster_mode_against_each_eager",)),
    Mutant("torch backend: max-autotune compiles general in the batch", "server/torch_engine.py",
           "self.forward = torch.compile(self.module, mode=mode, dynamic=dynamic)",
           "self.forward = torch.compile(self.module, mode=mode, dynamic=None)",
           ("tests/test_torch_backend.py::test_max_autotune_compiles_each_bucket_static_and_matches_eager",)),
    Mutant("api keys: any bearer token accepted", "server/keys.py",
           'return scheme.lower() == "bearer" and bool(token) and matched',
           'return scheme.lower() == "bearer" and bool(token)',
           ("tests/test_server.py::test_api_keys",)),
    Mutant("search bench: a guided teacher step counted as one evaluation", "flowmap/bench_search.py",
           "cost = config.teacher_steps * (1 if task.guidance_scale == 1.0 else 2)", "cost = config.teacher_steps",
           ("tests/test_text_teacher.py::test_the_search_bench_counts_network_evaluations_honestly",)),
    Mutant("torch backend: low precision compared with float32 itself", "server/torch_engine.py",
           "error = relative_error(reference, low)", "error = relative_error(reference, reference)",
           ("tests/test_torch_backend.py::test_bf16_is_checked_against_fp32",)),
    Mutant("torch backend: the float32 output export saved left unread", "server/torch_engine.py",
           "if reference is None:  # an archive", "if True:  # an archive",
           ("tests/test_torch_backend.py::test_low_precision_is_checked_against_the_float32_output_export_saved",)),
    Mutant("torch backend: a program's graph left naming the CPU on a GPU", "server/torch_engine.py",
           "else move_to_device_pass(program, torch.device(device))", "else program",
           ("tests/test_torch_backend.py::test_a_program_moves_whole_to_its_device",)),
    Mutant("torch backend: every weight cast to low precision, norms and embeddings too", "server/torch_engine.py",
           "if reads and all(reads) and name in parameters]", "if name in parameters]",
           ("tests/test_torch_backend.py::test_bf16_casts_convolution_and_linear_weights_once_and_answers_as_autocast",)),
    Mutant("torch backend: a weight cast for an op autocast leaves in float32 on the device", "server/torch_engine.py",
           "and torch._C._dispatch_has_kernel_for_dispatch_key(user.target.name(), autocast)", "",
           ("tests/test_torch_backend.py::test_weights_are_cast_only_where_autocast_runs_their_op",)),
    Mutant("torch backend: --torch-float32-stages ignored", "server/settings.py",
           'dtype = "float32" if engine and stage_of(engine) in self.torch_float32_stages else self.torch_dtype',
           "dtype = self.torch_dtype",
           ("tests/test_torch_backend.py::test_stages_named_float32_stay_float32_under_bf16",)),
    Mutant("GPU bench: resumes parts measured with other timed code", "flowmap/gpu_report.py",
           'return [part for part in held if recorded.get(part) != versions[part]]', "return []",
           ("tests/test_bench_gpu.py::test_a_cut_off_gpu_bench_resumes_where_it_stopped",)),
    Mutant("GPU bench: stage rows kept that other code timed", "flowmap/bench_gpu.py",
           'if "stages" not in other_code\n', "if True\n",
           ("tests/test_bench_gpu.py::test_a_cut_off_gpu_bench_resumes_where_it_stopped",)),
    Mutant("GPU bench: a part's code version misses imports made inside functions", "flowmap/provenance.py",
           "for node in ast.walk(ast.parse(path.read_text())):", "for node in ast.parse(path.read_text()).body:",
           ("tests/test_bench_gpu.py::test_each_part_is_versioned_by_the_code_it_runs",)),
    Mutant("GPU report: a denoiser's channels-last modes, skipped on purpose, reported missing",
           "flowmap/gpu_report.py",
           '"out of memory at batch",\n' + " " * 56 + '"channels-last is timed on the decoders"))',
           '"out of memory at batch"))',
           ("tests/test_bench_gpu.py::test_the_gpu_bench_runs_every_part_on_a_cpu",)),
    Mutant("encoding: a kind not timed yet scaled from the farthest kind timed", "server/encoding.py",
           "return images * pixels * min(alike)[1] if alike else 0.0",
           "return images * pixels * max(alike)[1] if alike else 0.0",
           ("tests/test_encoding.py::test_the_warm_up_times_each_format_and_a_new_kind_scales_from_the_nearest_in_"
            "pixels",)),
    Mutant("encoding: a kind not timed yet given the nearest kind's time per image, not per pixel",
           "server/encoding.py",
           "return images * pixels * min(alike)[1] if alike else 0.0",
           "return images * kind_pixels(kind) * min(alike)[1] / pixels if alike else 0.0",
           ("tests/test_encoding.py::test_an_encoding_job_is_timed_by_its_kind_for_admission",)),
    Mutant("Triton: a text bundle's ensemble leaves the student's condition to the client", "export/triton.py",
           '"label" if text_encoder else None', "None",
           ("tests/test_triton.py::test_a_text_bundles_ensemble_takes_token_ids_and_gives_the_images",)),
    Mutant("demo: a mounted demo calls loopback whatever address its server listens on", "ui/demo.py",
           "build_demo(own_url(settings.host, settings.port)", 'build_demo(own_url("0.0.0.0", settings.port)',
           ("tests/test_ui.py::test_with_api_keys_the_demo_asks_for_a_key_and_forwards_it",)),
    Mutant("keys: files sent to the demo's Gradio routes need no key when keys are set", "server/keys.py",
           "return path.startswith(GUARDED_PREFIXES) or sends_files", "return path.startswith(GUARDED_PREFIXES)",
           ("tests/test_ui.py::test_with_api_keys_the_demo_asks_for_a_key_and_forwards_it",)),
    Mutant("errors: every one of thousands of wrong fields described", "server/errors.py",
           "list(by_field.items())[:MAX_FIELDS_DESCRIBED]", "list(by_field.items())",
           ("tests/test_server.py::test_a_body_of_many_unknown_fields_gets_a_short_message",)),
    Mutant("admission: a request holds an engine's rows until it ends, not until its last call there",
           "server/stages.py", "ticket.done_with(engine)  #", "pass  #",
           ("tests/test_admission.py::test_an_engine_the_request_will_not_call_again_gets_its_rows_back_at_once",)),
    Mutant("admission: the text encoder reserves a negative prompt for every image", "server/stages.py",
           "EncodePrompts(distinct_prompts or rows,", "EncodePrompts(rows * (1 + negative),",
           ("tests/test_text_serving.py::test_the_text_encoder_holds_a_row_per_distinct_prompt_a_negative_one_"
            "included",)),
    Mutant("admission: the text encoder reserves a row per image (repeated prompts and all) and the negative's",
           "server/stages.py", "EncodePrompts(distinct_prompts or rows,", "EncodePrompts(rows + negative,",
           ("tests/test_text_serving.py::test_the_text_encoder_holds_a_row_per_distinct_prompt_a_negative_one_"
            "included",)),
    Mutant("costs: one slow batch moves the estimate by its whole time", "server/costs.py",
           "min(seconds, self.max_jump * known)", "seconds",
           ("tests/test_admission.py::test_one_slow_batch_moves_the_cost_by_a_step_and_a_lasting_slowdown_is_"
            "followed",)),
    Mutant("costs: a bucket's first run taken whole, however far above what it borrowed", "server/costs.py",
           "known = old if old is not None else self.seconds(rows) if self._seconds else None", "known = old",
           ("tests/test_admission.py::test_one_slow_batch_moves_the_cost_by_a_step_and_a_lasting_slowdown_is_"
            "followed",)),
    Mutant("errors: an unknown field's name echoed whole", "server/errors.py",
           'name = part if len(part) <= MAX_NAME_SHOWN else f"{part[:MAX_NAME_SHOWN]}... ({len(part)} characters)"',
           "name = part",
           ("tests/test_server.py::test_a_body_of_many_unknown_fields_gets_a_short_message",)),
    Mutant("trainer: --no-resume overwrites a run of another kind (a teacher)", "distill/trainer.py",
           'if old_meta is not None and old_meta.get("kind") != meta.get("kind"):',
           'if resume and old_meta is not None and old_meta.get("kind") != meta.get("kind"):',
           ("tests/test_checkpoint.py::test_a_run_is_never_overwritten_by_another_kind_nor_resumed_by_another_"
            "method",)),
    Mutant("trainer: a student resumed with another method", "distill/trainer.py",
           'old_meta.get("method") != meta.get("method")', "False",
           ("tests/test_checkpoint.py::test_a_run_is_never_overwritten_by_another_kind_nor_resumed_by_another_"
            "method",)),
    Mutant("trainer: a resumed run's log keeps the lines past its checkpoint", "distill/trainer.py",
           'json.loads(line).get("step", 0) <= step', "True",
           ("tests/test_checkpoint.py::test_a_resumed_run_logs_each_step_once_and_a_fresh_one_starts_its_log_anew",)),
    Mutant("trainer: Ctrl-C stops mid-step, saving nothing", "distill/trainer.py",
           "        self._event.set()\n", "        raise KeyboardInterrupt\n",
           ("tests/test_checkpoint.py::test_ctrl_c_saves_the_step_reached_and_the_same_command_resumes",)),
    Mutant("export: a student of another teacher exported against this one", "export/writer.py",
           "    if differs:\n        origin", "    if False:\n        origin",
           ("tests/test_latent.py::test_export_refuses_what_would_not_fit"
            "_and_a_bundle_of_rgba_images_serves_png_and_webp",)),
    Mutant("export: a verifier of other classes than the teacher's accepted", "export/writer.py",
           "if len(verifier_classes) != teacher.num_classes:", "if False:",
           ("tests/test_latent.py::test_export_refuses_what_would_not_fit"
            "_and_a_bundle_of_rgba_images_serves_png_and_webp",)),
    Mutant("export: two guidance scales of one file name accepted", "export/writer.py",
           "if tags.count(tag) > 1", "if tags.count(tag) > 2",
           ("tests/test_latent.py::test_export_refuses_what_would_not_fit"
            "_and_a_bundle_of_rgba_images_serves_png_and_webp",)),
    Mutant("export: a second export into a bundle's folder keeps the first's files", "export/writer.py",
           "    if out.exists():\n        shutil.rmtree(out)\n    os.replace(staging, out)",
           "    for path in staging.iterdir():\n        os.replace(path, out / path.name)",
           ("tests/test_latent.py::test_export_refuses_what_would_not_fit"
            "_and_a_bundle_of_rgba_images_serves_png_and_webp",)),
    Mutant("serving: RGBA images offered as jpeg", "server/encoding.py",
           'not (shape[0] == 4 and name == "jpeg")', "True",
           ("tests/test_latent.py::test_export_refuses_what_would_not_fit"
            "_and_a_bundle_of_rgba_images_serves_png_and_webp",)),
    Mutant("pipeline: the teacher's data looked up by its name, not where it was read from", "distill/pipeline.py",
           'source = recorded.get("source") or recorded.get("name")', 'source = recorded.get("name")',
           ("tests/test_checkpoint.py::test_a_method_that_trains_on_data_reads_the_teachers_own_file_or_asks_for_"
            "data",)),
    Mutant("pipeline: --init ignored by a self-taught run", "distill/pipeline.py",
           "        if init is not None:\n            student = load_student(init)",
           "        if init is not None and teacher is not None:\n            student = load_student(init)",
           ("tests/test_methods.py::test_self_teacher_runs_with_no_teacher_at_all",)),
    Mutant("pipeline: --data of other samples than the teacher's accepted", "distill/pipeline.py",
           'list(data.shape) != made["shape"] or data.num_classes > made["num_classes"])', "False)",
           ("tests/test_checkpoint.py::test_a_method_that_trains_on_data_reads_the_teachers_own_file_or_asks_for_"
            "data",)),
    Mutant("teachers: a SiT checkpoint missing a tensor ends in torch's KeyError", "distill/models.py",
           "except (KeyError, IndexError, RuntimeError, AttributeError, pickle.UnpicklingError) as err:",
           "except (IndexError, RuntimeError, AttributeError, pickle.UnpicklingError) as err:",
           ("tests/test_sit.py::test_a_file_that_is_not_a_whole_sit_checkpoint_is_one_clear_error",)),
    Mutant("settings: any intra-op thread count accepted", "server/settings.py",
           "intra_op_threads: int = Field(0, ge=0, le=256,", "intra_op_threads: int = Field(0, ge=0,",
           ("tests/test_server.py::test_a_setting_out_of_range_is_one_line_naming_its_flag_variable_and_range",)),
    Mutant("settings: infinite and NaN floats accepted", "server/settings.py",
           'extra="ignore", allow_inf_nan=False)', 'extra="ignore")',
           ("tests/test_server.py::test_a_setting_out_of_range_is_one_line_naming_its_flag_variable_and_range",)),
    Mutant("settings: a torch flag given to another backend silently ignored", "server/settings.py",
           "            if given:\n", "            if False:\n",
           ("tests/test_torch_backend.py::test_options_name_the_bad_flag",)),
    Mutant("serve: onnxruntime providers checked only inside the server's start-up", "flowmap/cli.py",
           "        check_providers(settings.providers)\n", "        pass\n",
           ("tests/test_server.py::test_providers_this_onnxruntime_lacks_are_refused_before_the_server_starts",)),
    Mutant("encoding: the warm-up counted in the metrics as if requests had asked for it", "server/encoding.py",
           "self._encode(images, output, metered=False)", "self._encode(images, output)",
           ("tests/test_encoding.py::test_the_warm_up_times_each_format_and_a_new_kind_scales_from_the_nearest_in_"
            "pixels",)),
    Mutant("imaging: the largest upscale judged by an image's shorter side", "server/imaging.py",
           "max(1, max_side // max(height, width))", "max(1, max_side // min(height, width))",
           ("tests/test_encoding.py::test_the_largest_upscale_is_the_largest_size_a_request_may_ask",)),
    Mutant("encoding: the warm-up times images at their native size only", "server/encoding.py",
           "for upscale in sorted({1, largest})", "for upscale in [1]",
           ("tests/test_encoding.py::test_the_warm_up_times_each_format_and_a_new_kind_scales_from_the_nearest_in_"
            "pixels",)),
    Mutant("admission: the encoding admitted ahead left out of a request's time", "server/admission.py",
           "encoders = self.host_backlog_s / self.host_threads if host_s else 0.0", "encoders = 0.0",
           ("tests/test_admission.py::test_encoding_admitted_ahead_shares_the_encode_threads_and_a_request_behind_it"
            "_is_429",)),
    Mutant("admission: a finished request's encoding never leaves the backlog", "server/admission.py",
           "self.host_backlog_s = max(0.0, self.host_backlog_s - host_s)",
           "self.host_backlog_s = max(0.0, self.host_backlog_s)",
           ("tests/test_admission.py::test_encoding_admitted_ahead_shares_the_encode_threads_and_a_request_behind_it"
            "_is_429",)),
    Mutant("door: a request's body read with no deadline", "server/door.py",
           "async with asyncio.timeout(settings.request_timeout_s):", "async with asyncio.timeout(None):",
           ("tests/test_server.py::test_a_body_shorter_than_its_content_length_gets_408_within_the_request_timeout",)),
    Mutant("encoding: a request's wait for an encode thread left uncounted", "server/encoding.py",
           'self._spent("wait", time.perf_counter() - queued)', 'self._spent("wait", 0.0)',
           ("tests/test_encoding.py::test_the_encoder_times_its_waits_its_copies_and_its_encoding",)),
    Mutant("device pixels: truncated, not rounded", "server/gpu_jpeg.py",
           "return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)",
           "return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)",
           ("tests/test_torch_backend.py::test_the_device_quantises_as_the_host_does_halves_and_overflow_included",)),
    Mutant("device pixels: not clipped to [-1, 1]", "server/gpu_jpeg.py",
           "return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)",
           "return ((images + 1.0) * 127.5).round().to(torch.uint8)",
           ("tests/test_torch_backend.py::test_the_device_quantises_as_the_host_does_halves_and_overflow_included",)),
    Mutant("decoder: its host pixels in the layout of its device images", "server/torch_engine.py",
           "pixels = quantised(images).permute(0, 2, 3, 1).contiguous()", "pixels = quantised(images).contiguous()",
           ("tests/test_torch_backend.py::test_a_decoder_hands_on_its_images_on_the_device_and_their_pixels_on_the_host",)),
    Mutant("encoding: the decoder's host pixels ignored, its device images copied and quantised again",
           "server/encoding.py",
           "pixels = images.pixels if isinstance(images, DeviceImages) else to_uint8(on_host(images))",
           "pixels = to_uint8(on_host(images))",
           ("tests/test_torch_backend.py::test_a_decoder_hands_on_its_images_on_the_device_and_their_pixels_on_the_host",)),
    Mutant("metrics: the loop's lag counts the sleep it asked for", "server/metrics.py",
           "asked = loop.time() + period_s", "asked = loop.time()",
           ("tests/test_batcher.py::test_the_loop_lag_probe_sees_the_loop_held",)),
    Mutant("GPU bench: the one-step figure leaves the decoder out", "flowmap/gpu_report.py",
           'round(denoiser["ms"] + decoder["ms"], 2)', 'round(denoiser["ms"], 2)',
           ("tests/test_bench_gpu.py::test_the_gpu_bench_runs_every_part_on_a_cpu",)),
    Mutant("GPU bench: one-step throughput read at batch 1 only", "flowmap/gpu_report.py",
           'ms_per_image = sum(min(r["ms"] / r["batch"] for r in rows)',
           'ms_per_image = sum(min(r["ms"] for r in rows)',
           ("tests/test_bench_gpu.py::test_the_gpu_bench_runs_every_part_on_a_cpu",)),
    Mutant("GPU bench: FLOPs counted on the CPU (its fused attention uncounted)", "flowmap/gpu_stages.py",
           'graph.to("meta")(*(value.to("meta") for value in inputs(1).values()))', "graph(*inputs(1).values())",
           ("tests/test_bench_gpu.py::test_flops_count_attention_as_a_gpu_runs_it",)),
    Mutant("decoder program: carries the VAE's encoder", "export/decoder.py",
           'for name in ("encoder", "quant_conv"):', "for name in ():",
           ("tests/test_torch_backend.py::test_a_model_that_branches_on_the_batch_size_exports_over_the_range_its_branch_holds",)),
    Mutant("torch backend: a batch over the largest power of two has no bucket made at start", "server/torch_engine.py",
           "return wanted if buckets or max_batch in wanted else (*wanted, max_batch)", "return wanted",
           ("tests/test_torch_backend.py::test_every_batch_a_batcher_can_send_has_a_bucket_made_at_start",)),
    Mutant("GPU JPEG: grayscale images sent to nvJPEG", "server/encoding.py",
           "output.format == \"jpeg\" and shape[0] == 3", "output.format == \"jpeg\"",
           ("tests/test_encoding.py::test_gpu_jpeg_takes_rgb_only_and_a_failure_falls_back_to_the_cpu",)),
    Mutant("search bench: the teacher finish not charged to (c)", "flowmap/bench_search.py",
           "n = (m - 1) * cost", "n = m * cost",
           ("tests/test_text_teacher.py::test_the_search_bench_counts_network_evaluations_honestly",)),
    Mutant("export: the ONNX exporter traces each graph again beside its program", "export/writer.py",
           "external_data, program=traced)", "external_data, program=None)",
           ("tests/test_torch_backend.py::test_every_graph_has_a_hashed_program_that_matches_onnx",)),
    Mutant("settings: onnxruntime's CUDA provider taken for a CPU", "server/settings.py",
           "return self.providers != \"cpu\"", "return self.providers == \"tensorrt\"",
           ("tests/test_server.py::test_engines_on_a_gpu_get_more_encode_threads",)),
    Mutant("settings: the encode threads not capped at eight", "server/settings.py",
           "return min(8, max(2, cores // 2))", "return max(2, cores // 2)",
           ("tests/test_server.py::test_engines_on_a_gpu_get_more_encode_threads",)),
    Mutant("server: Python's switch interval not put back at shutdown", "server/app.py",
           "            sys.setswitchinterval(python_default)\n", "",
           ("tests/test_server.py::test_the_server_runs_with_its_switch_interval_and_puts_pythons_back",)),
    Mutant("hand-off bench: the busy threads' loops not counted", "flowmap/gil_handoff.py",
           "        loops[slot] += 1\n", "        pass\n",
           ("tests/test_gil_handoff.py::test_a_trial_runs_its_jobs_beside_its_busy_threads_at_its_interval_and_puts_"
            "the_interval_back",)),
    Mutant("torch backend: channels-last weights transposed, not laid out", "server/torch_engine.py",
           "parameters[name].data.contiguous(memory_format=torch.channels_last)",
           "parameters[name].data.permute(0, 2, 3, 1).contiguous()",
           ("tests/test_torch_backend.py::test_channels_last_lays_out_the_convolutions_and_answers_as_the_default_"
            "layout",)),
    Mutant("torch backend: channels-last inputs left as they came", "server/torch_engine.py",
           "if not self.channels_last:\n            return inputs", "if True:\n            return inputs",
           ("tests/test_torch_backend.py::test_channels_last_lays_out_the_convolutions_and_answers_as_the_default_"
            "layout",)),
    Mutant("torch backend: channels-last finds only the plain convolution overloads", "server/torch_engine.py",
           "getattr(node.target, \"overloadpacket\", None) in convolutions",
           "node.target in (aten.conv2d.default, aten.convolution.default)",
           ("tests/test_torch_backend.py::test_channels_last_finds_every_kind_of_2d_convolution",)),
    Mutant("GPU bench: a channels-last mode timed on a denoiser", "flowmap/gpu_stages.py",
           "MODES[mode].get(\"channels_last\") and name not in DECODERS", "False",
           ("tests/test_bench_gpu.py::test_the_gpu_bench_runs_every_part_on_a_cpu",)),
    Mutant("demo: the sweeper walks Gradio's live set of files", "ui/temp_files.py",
           "for name in list(names):", "for name in names:",
           ("tests/test_ui.py::test_the_sweeper_deletes_old_files_while_requests_add_new_ones",)),
    Mutant("resume: a folder named two ways counted as two", "distill/trainer.py",
           "return os.path.realpath(before) == os.path.realpath(now)", "return before == now",
           ("tests/test_checkpoint.py::test_a_folder_named_relative_or_absolute_is_the_same_setting",)),
    Mutant("prompt cache: a prompt remembered twice counted twice", "server/prompts.py",
           "self.held_bytes -= self.cache.pop(prompt).nbytes", "self.cache.pop(prompt)",
           ("tests/test_text_serving.py::test_the_prompt_cache_is_bounded_by_bytes_as_well_as_by_prompts",)),
    Mutant("prompt cache: bounded by prompts only", "server/prompts.py",
           "while len(self.cache) > self.cache_size or self.held_bytes > budget:",
           "while len(self.cache) > self.cache_size:",
           ("tests/test_text_serving.py::test_the_prompt_cache_is_bounded_by_bytes_as_well_as_by_prompts",)),
    Mutant("serve: Ray flags without --ray silently ignored", "flowmap/cli.py",
           "if not args.ray and ray_options != ray_fields:", "if False:",
           ("tests/test_cli.py::test_serve_refuses_ray_flags_it_would_ignore_or_ray_would_fail_on",)),
    Mutant("serve: Ray replicas not checked", "server/settings.py",
           "if not lowest <= value < float(\"inf\"):", "if not value >= lowest:",
           ("tests/test_cli.py::test_serve_refuses_ray_flags_it_would_ignore_or_ray_would_fail_on",)),
    Mutant("conditions: rows of one prompt copied", "server/stages.py",
           "    if len(set(prompts)) == 1:\n", "    if False:\n",
           ("tests/test_text_serving.py::test_rows_of_one_prompt_share_one_condition_and_mixed_prompts_keep_theirs",)),
    Mutant("admission: host memory for images not reserved", "server/service.py",
           "        if IMAGES in self.admission.loads:\n", "        if False:\n",
           ("tests/test_server.py::test_images_held_on_the_host_are_bounded_by_max_images_mb",)),
    Mutant("admission: images counted from the last stage, not the widest", "server/admission.py",
           "widest = max(needs, key=lambda need: need.rows)", "widest = needs[-1]",
           ("tests/test_admission.py::test_host_memory_for_images_is_a_queue_of_its_own",)),
    Mutant("admission: a queue's own size ignored", "server/admission.py",
           "self.loads[n.engine].rows + n.rows <= self.max_rows(n.engine)",
           "self.loads[n.engine].rows + n.rows <= self.max_queue_rows",
           ("tests/test_admission.py::test_host_memory_for_images_is_a_queue_of_its_own",)),
    Mutant("admission: an image's noise and sample not counted", "server/app.py",
           "return 4 * (math.prod(bundle.image_shape) + 2 * math.prod(bundle.sample_shape))",
           "return 4 * math.prod(bundle.image_shape)",
           ("tests/test_server.py::test_images_held_on_the_host_are_bounded_by_max_images_mb",)),
    Mutant("generate: raw arrays of any size", "server/routes.py",
           'if body.format == "raw" and values > MAX_RAW_VALUES:', 'if False:',
           ("tests/test_server.py::test_raw_arrays_are_refused_beyond_the_values_a_json_response_holds",)),
    Mutant("quantise: the last chunk of images left unquantised", "server/imaging.py",
           "for start in range(0, len(images), rows):", "for start in range(0, len(images) - 1, rows):",
           ("tests/test_encoding.py::test_quantising_and_joining_a_few_rows_at_a_time_change_no_value",)),
    Mutant("join rows: every block written at the start", "server/imaging.py",
           "        start += len(part)\n", "",
           ("tests/test_encoding.py::test_quantising_and_joining_a_few_rows_at_a_time_change_no_value",)),
    Mutant("score: the candidates clipped into a second copy", "server/stages.py",
           "np.clip(images, -1, 1, out=images if images.flags.writeable else None)", "np.clip(images, -1, 1)",
           ("tests/test_text_serving.py::test_scoring_clips_the_candidates_in_place_and_encoding_lets_the_floats_go",)),
    Mutant("score: a read-only array clipped in place", "server/stages.py",
           "np.clip(images, -1, 1, out=images if images.flags.writeable else None)",
           "np.clip(images, -1, 1, out=images)",
           ("tests/test_text_serving.py::test_scoring_clips_the_candidates_in_place_and_encoding_lets_the_floats_go",)),
    Mutant("encode: the float images kept after encoding", "server/stages.py",
           "        state.x = None  # the float images", "        pass  # the float images",
           ("tests/test_text_serving.py::test_scoring_clips_the_candidates_in_place_and_encoding_lets_the_floats_go",)),
    Mutant("conditions: views of the text encoder's batch kept", "server/stages.py",
           "conditions[unique[i]] = condition = condition.copy()", "conditions[unique[i]] = condition",
           ("tests/test_text_serving.py::test_a_requests_conditions_do_not_keep_the_text_encoders_batch_alive",)),
    Mutant("batch: padding rows left unset", "server/engines.py",
           "    out[rows:] = out[rows - 1]\n", "",
           ("tests/test_batcher.py::test_batches_are_padded_to_the_engine_buckets_and_the_padding_is_dropped",)),
    Mutant("join rows: every part kept alive until the end", "server/imaging.py",
           "    while parts:\n        part = parts.pop(0)\n", "    for part in list(parts):\n",
           ("tests/test_host_memory.py::test_the_served_array_handling_holds_less_than_the_whole_array_forms",)),
]


def copy_tree(destination: Path) -> None:
    """The files git tracks plus the untracked ones it does not ignore, as they are now."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[bool, list[str], float]:
    """(passed, ids of the failed tests, seconds) for `tests` run in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                            cwd=tree, env=env, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.MULTILINE)
    return result.returncode == 0, failed, time.perf_counter() - started


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTANTS if not argv or any(word in m.name for word in argv)]
    with tempfile.TemporaryDirectory(prefix="flowmap-mutants-") as folder:
        tree = Path(folder)
        copy_tree(tree)
        for mutant in chosen:
            if (tree / mutant.path).read_text().count(mutant.original) != 1:
                print(f"mutant {mutant.name!r}: {mutant.original!r} is not in {mutant.path} exactly once; update "
                      "the list", file=sys.stderr)
                return 1
        every_test = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        passed, failed, seconds = run_tests(tree, every_test)
        print(f"unmutated tree: {len(every_test)} tests {'pass' if passed else 'FAIL'} ({seconds:.0f} s)")
        if not passed:
            print("  failing: " + ", ".join(failed), file=sys.stderr)
            return 1
        survivors = []
        for mutant in chosen:
            path = tree / mutant.path
            original = path.read_text()
            path.write_text(original.replace(mutant.original, mutant.mutated))
            try:
                passed, failed, seconds = run_tests(tree, mutant.tests)
            finally:
                path.write_text(original)
            verdict = "SURVIVED" if passed else "killed by " + ", ".join(failed or ["a test run error"])
            print(f"{mutant.name:58s} {verdict} ({seconds:.0f} s)")
            if passed:
                survivors.append(mutant.name)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants killed"
          + (f"; survivors: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
