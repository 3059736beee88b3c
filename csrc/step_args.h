// The arguments of the step ops (robust_step_fwd / _bwd and their CPU _keep / _kept forms),
// written once: StepArgs's fields, the schema text (schemas.cpp) and the parameter list of
// every registered step lambda (step_ops.h, cpu/step_cpu.cpp) are generated from
// RFT_STEP_ARGS_TAIL. The Python twin is robustft_ext.ops.robust_step.StepArgs.
//
// The list holds every argument after the first, `image` (so that each generated list can
// start without a comma): X(field type, parameter type, name, schema type).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#define RFT_STEP_ARGS_TAIL(X)                                                          \
  X(at::Tensor, const at::Tensor&, text, "Tensor")                                     \
  X(at::Tensor, const at::Tensor&, clip_scale, "Tensor")                               \
  X(at::Tensor, const at::Tensor&, m2_scale, "Tensor")                                 \
  X(at::Tensor, const at::Tensor&, lam, "Tensor")                                      \
  X(bool, bool, with_m2, "bool")                                                       \
  X(bool, bool, with_clip, "bool")                                                     \
  X(c10::optional<at::Tensor>, const c10::optional<at::Tensor>&, image_pre, "Tensor?")    \
  X(c10::optional<at::Tensor>, const c10::optional<at::Tensor>&, lipsum_texts, "Tensor?") \
  X(at::Tensor, const at::Tensor&, lipsum_scale, "Tensor")                             \
  X(c10::optional<at::Tensor>, const c10::optional<at::Tensor>&, ref_image_ft, "Tensor?") \
  X(c10::optional<at::Tensor>, const c10::optional<at::Tensor>&, ref_text_ft, "Tensor?")  \
  X(c10::optional<at::Tensor>, const c10::optional<at::Tensor>&, ref_image_pre, "Tensor?") \
  X(c10::optional<at::Tensor>, const c10::optional<at::Tensor>&, ref_text_pre, "Tensor?") \
  X(c10::optional<at::Tensor>, const c10::optional<at::Tensor>&, center, "Tensor?")

#define RFT_STEP_SCHEMA_ARG_(F, P, name, schema) ", " schema " " #name
#define RFT_STEP_PARAM_(F, P, name, schema) , P name
#define RFT_STEP_NAME_(F, P, name, schema) , name
#define RFT_STEP_FIELD_(F, P, name, schema) F name{};

// "Tensor image, Tensor text, ..., Tensor? center": the arguments in a schema.
#define RFT_STEP_SCHEMA "Tensor image" RFT_STEP_ARGS_TAIL(RFT_STEP_SCHEMA_ARG_)
// The parameters of a registered lambda, and the StepArgs made from them.
#define RFT_STEP_PARAMS const at::Tensor& image RFT_STEP_ARGS_TAIL(RFT_STEP_PARAM_)
#define RFT_STEP_ARGS ::robustft::StepArgs{image RFT_STEP_ARGS_TAIL(RFT_STEP_NAME_)}

namespace robustft {

// The arguments of a step op as the schema gives them (absent optional parts empty).
struct StepArgs {
  at::Tensor image;
  RFT_STEP_ARGS_TAIL(RFT_STEP_FIELD_)
};

}  // namespace robustft
