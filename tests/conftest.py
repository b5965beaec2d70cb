"""Test-wide settings: two host CPU devices for pmap tests and a compilation cache.

These must be set before JAX initialises its backends, so they live here.
"""

import os
import pathlib

_ROOT = pathlib.Path(__file__).resolve().parent.parent

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402

from golden_io import GOLDEN_DIR  # noqa: E402,F401  pylint: disable=unused-import
from golden_io import load_golden_unet  # noqa: E402,F401  pylint: disable=unused-import

# The tests left out of the fast tier (`pytest -m "not slow"`; docs/contributing.md): whole files
# (SLOW_FILES), and tests of a file (SLOW_TESTS: a name covers every parametrization, "name[id]"
# one), each with its time in a full run of the suite on the 2-core machine (`--durations=0`, two
# xdist workers, the setup of the fixtures it needs included, while other jobs shared the cores:
# about twice an idle machine's). A test whose module fixture is slow goes with the fixture.
# tests/test_fast_tier.py checks that the fast tier still imports every module of ipr_jax/ and
# that every entry names a test that exists.
SLOW_FILES: dict[str, str] = {
    "test_bench.py": "369 s (its rehearsal fixture; the plan, cut and wheel tests: 5 s)",
    "test_wheel.py": "31 s",
    "test_eval_overlap.py": "130 s (-n 0, load 8; 32 s idle): five evaluate runs",
}
SLOW_TESTS: dict[str, dict[str, str]] = {
    "test_notebook.py": {
        "test_shipped_model_section_shows_iterations_and_table": (
            "executes the notebook in a kernel: minutes"
        ),
        "test_training_section_trains_saves_and_evaluates": "the same executed notebook",
    },
    "test_nine_by_nine.py": {
        "test_the_call_trains_checkpoints_and_writes_the_table": (
            "180 s: the `rehearsed` fixture (two device calls at tiny size)"
        ),
        "test_a_later_call_resumes_the_carried_run": "0 s, and the `rehearsed` fixture",
    },
    "test_external_task.py": {
        "test_the_example_task_trains_and_evaluates": "93 s",
    },
    "test_flows.py": {
        "test_a_diffusion_flow_trains_and_samples": "35 s (-n 0, load 5): 2 train steps, SRM + IPR",
    },
    "test_train.py": {
        "test_remat_and_accumulation_give_the_plain_update": "440 s",
        "test_sigterm_then_resume_equals_uninterrupted_run": "191 s",
        "test_pmap_over_two_devices_equals_one_device_on_the_full_batch": "187 s",
        "test_two_processes_resume_a_checkpoint_and_train_like_one": "184 s",
        "test_a_few_hundred_steps_reduce_the_loss": "122 s",
        "test_nan_loss_stops_without_saving_the_bad_state": "65 s",
        "test_time_limit_stops_with_a_checkpoint_and_log_fn_sees_every_record": "25 s",
        "test_checkpoint_every_s_saves_by_the_clock_between_step_checkpoints": "13 s",
    },
    "test_counting_polygons_run.py": {
        "test_train_runs_on_host_rendered_images": "118 s: the `trained` fixture",
        "test_resume_sees_the_same_images": "27 s",
        "test_evaluate_writes_both_metrics_per_budget": "54 s",
        "test_missing_scorer_weights_are_a_clear_error": "1 s, and the `trained` fixture",
        "test_score_fn_agrees_with_the_batch_metrics": "16 s",
    },
    "test_chains.py": {
        "test_chains_are_single_chain_runs_and_the_lowest_score_wins": "111 s",
        "test_chains_chosen_at_the_final_budget_query_only_the_last_iterates": (
            "22 s beside an evaluation, compile cache warm"
        ),
        "test_chains_read_neither_the_solution_nor_a_verifier": "24 s",
        "test_query_cells_all_scores_the_given_cells": "43 s",
        "test_the_evaluation_binary_runs_chains": "196 s",
    },
    "test_verifier_free.py": {
        "test_verifier_free_outputs_do_not_depend_on_the_scorer": "318 s",
        "test_the_settings_that_read_a_verifier_do_change_under_an_oracle": "98 s",
    },
    "test_fit.py": {
        "test_train_step_cost_is_smaller_with_accumulation_and_remat": "143 s",
        "test_auto_batch_follows_the_compiled_analysis": "122 s",
        "test_resolve_auto_batch_size": "18 s",
    },
    "test_faults.py": {
        "test_a_full_disk_stops_training_in_one_line_and_the_rerun_resumes": "244 s",
        "test_a_failed_async_save_stops_training_at_the_next_step": "60 s",
        "test_sigterm_saves_and_exits_with_the_preempted_status": "41 s",
        "test_resuming_cuts_metrics_back_to_the_restored_step": "16 s",
        "test_a_killed_save_does_not_block_the_rerun": "16 s",
        "test_a_checkpoint_of_another_geometry_is_refused_unless_allowed": "13 s",
    },
    "test_evaluate.py": {
        "test_a_signal_to_one_process_stops_both_and_the_rerun_finishes": "91 s",
        "test_a_batch_that_fails_on_one_process_ends_both_and_the_rerun_finishes": "59 s",
        "test_two_processes_split_the_batches_and_match_one_process": "54 s",
        "test_even_pixels_columns_and_iterations": "47 s",
        "test_even_pixels_results_do_not_depend_on_batch_size": "18 s",
        "test_uncertainty_variant_writes_both_iterates_and_counts_its_query": "38 s",
        "test_interrupted_run_at_another_batch_size_resumes_to_the_same_results": "34 s",
        "test_evaluator_per_puzzle_results_do_not_depend_on_the_batch": "32 s",
        "test_results_json_is_strict_json_for_every_variant": "99 s",
        "test_processes_that_would_compute_different_things_end_together": "21 s",
        "test_the_record_check_fails_for_a_changed_model_or_sampler": "53 s",
        "test_budget_zero_is_the_plain_srm_run_at_any_batch_size": "19 s",
        "test_a_settings_mismatch_ends_both_processes_with_the_same_message": "17 s",
        "test_a_damaged_shard_and_stale_temporaries_are_cleaned_at_resume": "13 s",
    },
    "test_pretrained.py": {
        "test_save_load_roundtrip": "41 s: the `tiny` fixture",
        "test_bad_files_are_clear_errors": "2 s, and the `tiny` fixture",
        "test_check_compatible_names_the_changed_field": "1 s, and the `tiny` fixture",
        "test_export_run_writes_the_ema_weights_and_record": "4 s, and the `tiny` fixture",
    },
    "test_time_sampler.py": {
        "test_mean_beta_times_shapes_range_and_permutation": "58 s: the `ep_draw` fixture",
        "test_histogram_weights_average_one_over_sampled_times": "3 s, and the `ep_draw` fixture",
        "test_add_zeros_fraction_and_zero_weights": "29 s",
        "test_split_total_keeps_sum_and_unit_range": "16 s",
        "test_density_of_two_patches_matches_closed_form": "15 s",
    },
    "test_polygon_scorer.py": {
        "test_build_scorer_writes_a_loadable_file": "49 s",
        "test_shipped_scorer_meets_its_reported_accuracy": "29 s",
        "test_digit_map_feeds_the_numbers_head": "26 s",
        "test_heads_have_the_reference_class_counts": "24 s",
        "test_shipped_scorer_judges_rendered_images_like_their_render_info": "25 s",
    },
    "test_classifier.py": {
        "test_training_smoke": "23 s",
    },
    "test_convert.py": {
        "test_converted_lightning_checkpoint_holds_the_ema_parameters": "57 s",
    },
    "test_sampler.py": {
        "test_greedy_ms_run_prefix_matches_reference": "34 s",
        "test_greedy_matches_reference_run": "30 s",
        "test_greedy_ms_first_step_matches_reference": "19 s",
    },
    "test_sampler_family.py": {
        "test_the_evaluation_binary_runs_a_reference_sampler_test": "36 s",
        "test_the_python_api_runs_adaptive_top_k": "23 s",
    },
    "test_block_starts.py": {
        "test_ipr_regenerates_every_patch_with_repeated_starts": "24 s",
        "test_srm_sample_refuses_what_the_evaluation_refuses[settings3-16-None]": "18 s",
        "test_every_pass_follows_the_hand_written_time_map[repeated_starts]": "14 s",
    },
    "test_gaussian.py": {
        "test_discretized_log_likelihood_edges_and_floor": "24 s",
        "test_approx_cdf_matches_float64_formula_including_tails": "19 s",
    },
    "test_losses.py": {
        "test_raw_output_is_split_by_srm_head": "19 s",
        "test_gradients_are_separated_by_term_and_finite": "16 s",
    },
    "test_denoiser.py": {
        "test_make_denoise_fn_with_zero_output_conv": "25 s",
    },
    "test_digits.py": {
        "test_top_n_keeps_confident_digits": "16 s",
    },
    "test_unet.py": {
        "test_remat_keeps_the_parameters_and_the_gradients": "19 s",
        "test_forward_matches_reference[ms]": "14 s",
        "test_per_patch_time_embedding_equals_the_per_pixel_one": "13 s",
    },
}
# Node-id prefixes: "tests/<file>" and "tests/<file>::<name>".
SLOW = [f"tests/{f}" for f in SLOW_FILES] + [
    f"tests/{f}::{name}" for f, names in SLOW_TESTS.items() for name in names
]


def is_slow(nodeid: str, whole: bool = False) -> bool:
  """Whether the SLOW list leaves `nodeid` ("tests/test_x.py::test_y[p]") out of the fast tier;
  `whole`: all of it (a parametrization alone on the list leaves its test partly fast)."""
  path, _, rest = nodeid.partition("::")
  if path in SLOW:
    return True
  if not rest:
    return False
  if f"{path}::{rest.split('[', 1)[0]}" in SLOW:
    return True
  return not whole and nodeid in SLOW


def pytest_collection_modifyitems(items):
  for item in items:
    if is_slow(item.nodeid):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def golden_dir():
  return GOLDEN_DIR


def load_task_config(name: str, arg: str | None = None):
  """`configs/<name>.py:get_config(arg)`, loaded from its file as config_flags does."""
  from ipr_jax.build import config_base  # pylint: disable=g-import-not-at-top

  return config_base.load_config(f"{_ROOT / 'configs' / name}.py:{arg or ''}")


@pytest.fixture(scope="session")
def task_config():
  return load_task_config
