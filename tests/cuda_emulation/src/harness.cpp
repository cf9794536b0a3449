// Drives the real launchers of csrc/ops (compiled by the host compiler against the emulator) on
// one case described by a directory:
//   case.txt      "key value" lines: op (fwd | fwd_sm90 | bwd | bwd_sm90 | decode | mtp | logprobs_fwd |
//                 logprobs_bwd | rms_fwd | rms_bwd | rope | apply_rotary | swiglu_fwd |
//                 swiglu_bwd), emulator options, sizes, element offsets and strides, `buffers`
//                 (names) and `outputs` (names);
//   <name>.bin    the initial bytes of every buffer (inputs, and outputs with their initial
//                 contents: poison, or what the binding would initialise them to).
// Writes <name>.out.bin for every output and result.txt ("status <cudaError_t>" and op-specific
// values). The parameters are filled as csrc/bindings/*.cpp fill them; the Python side
// (tests/cuda_emulation/emulator.py) computes strides the way the bindings do.
// Exit status: 0 run completed (the launcher's status is in result.txt), 2 bad case,
// 3 emulator failure (message on stderr), 4 a buffer's guard bytes were overwritten.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "thinkfuse/flash_attention_params.cuh"
#include "thinkfuse/ops.h"
#include "thinkfuse_emu/runtime.h"

namespace {

std::string g_dir;
std::map<std::string, std::string> g_kv;
std::ostringstream g_result;

[[noreturn]] void bad_case(const std::string& msg) {
  std::fprintf(stderr, "harness: %s\n", msg.c_str());
  std::exit(2);
}

const std::string& S(const std::string& key) {
  auto it = g_kv.find(key);
  if (it == g_kv.end()) bad_case("case.txt has no key '" + key + "'");
  return it->second;
}
int64_t I(const std::string& key) { return std::stoll(S(key)); }
double F(const std::string& key) { return std::stod(S(key)); }
bool has(const std::string& key) { return g_kv.count(key) != 0; }
int64_t I(const std::string& key, int64_t fallback) { return has(key) ? I(key) : fallback; }

// A device-like allocation: 256-byte aligned, surrounded by guard bytes, registered with the
// emulator as global memory.
struct Buffer {
  static constexpr size_t kGuard = 512;
  static constexpr unsigned char kGuardByte = 0xFF;  // NaN: out-of-bounds reads poison results
  std::string name;
  std::vector<unsigned char> raw;
  unsigned char* data = nullptr;
  size_t bytes = 0;

  void allocate(const std::string& n, size_t size) {
    name = n;
    bytes = size;
    raw.assign(size + 2 * kGuard + 256, kGuardByte);
    const uintptr_t base = reinterpret_cast<uintptr_t>(raw.data()) + kGuard;
    data = reinterpret_cast<unsigned char*>((base + 255) & ~uintptr_t{255});
    emu::register_global(data, bytes, name.c_str());
  }
  bool guards_intact() const {
    for (const unsigned char* p = raw.data(); p < data; ++p) {
      if (*p != kGuardByte) return false;
    }
    for (const unsigned char* p = data + bytes; p < raw.data() + raw.size(); ++p) {
      if (*p != kGuardByte) return false;
    }
    return true;
  }
};

std::map<std::string, std::unique_ptr<Buffer>> g_buffers;

std::vector<std::string> words(const std::string& s) {
  std::istringstream in(s);
  return {std::istream_iterator<std::string>(in), std::istream_iterator<std::string>()};
}

Buffer& buffer(const std::string& name) {
  auto it = g_buffers.find(name);
  if (it == g_buffers.end()) bad_case("no buffer '" + name + "'");
  return *it->second;
}

// Address of element `offset` (elements of `elem` bytes) of a buffer.
void* at(const std::string& name, int64_t offset, int elem) {
  return buffer(name).data + offset * elem;
}

// A tensor view of the newer ops: element <name>_off of buffer <name>_buf (several views may
// share one buffer: the halves of a fused gate_up, or the logits and the gradient written over
// them).
void* view(const std::string& name, int elem) {
  return at(S(name + "_buf"), I(name + "_off"), elem);
}
template <typename T>
T* view_as(const std::string& name) {
  return static_cast<T*>(view(name, sizeof(T)));
}

Buffer& scratch(const std::string& name, size_t bytes, int fill) {
  auto b = std::make_unique<Buffer>();
  b->allocate(name, bytes);
  std::memset(b->data, fill, bytes);
  Buffer& ref = *b;
  g_buffers[name] = std::move(b);
  return ref;
}

thinkfuse::DType dtype(const std::string& s) {
  if (s == "fp32") return thinkfuse::DType::kFloat32;
  if (s == "fp16") return thinkfuse::DType::kFloat16;
  if (s == "bf16") return thinkfuse::DType::kBFloat16;
  bad_case("dtype " + s);
}

int elem_size(thinkfuse::DType d) { return d == thinkfuse::DType::kFloat32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------

// q/k/v/out and lse as csrc/bindings/flash_attention.cpp fills them (strides from the case).
thinkfuse::FlashAttnParams attention_params() {
  thinkfuse::FlashAttnParams p;
  p.q = at("q", I("q_off"), 2);
  p.k = at("k", I("k_off"), 2);
  p.v = at("v", I("v_off"), 2);
  p.q_batch_stride = I("q_bs"), p.q_seq_stride = I("q_ss"), p.q_head_stride = I("q_hs");
  p.k_batch_stride = I("k_bs"), p.k_seq_stride = I("k_ss"), p.k_head_stride = I("k_hs");
  p.v_batch_stride = I("v_bs"), p.v_seq_stride = I("v_ss"), p.v_head_stride = I("v_hs");
  p.out = at("out", I("o_off"), 2);
  p.o_batch_stride = I("o_bs"), p.o_seq_stride = I("o_ss"), p.o_head_stride = I("o_hs");
  p.lse = static_cast<float*>(at("lse", 0, 4));
  p.lse_batch_stride = I("lse_bs"), p.lse_head_stride = I("lse_hs");
  if (I("packed")) {
    p.cu_seqlens_q = static_cast<const int32_t*>(at("cu_q", 0, 4));
    p.cu_seqlens_k = static_cast<const int32_t*>(at("cu_k", 0, 4));
    p.total_q = I("total_q");
    p.total_k = I("total_k");
  }
  p.batch = static_cast<int>(I("batch"));
  p.heads_q = static_cast<int>(I("heads_q"));
  p.heads_kv = static_cast<int>(I("heads_kv"));
  p.group = p.heads_q / p.heads_kv;
  p.head_dim = static_cast<int>(I("head_dim"));
  p.max_seqlen_q = static_cast<int>(I("max_seqlen_q"));
  p.max_seqlen_k = static_cast<int>(I("max_seqlen_k"));
  const double scale = F("scale");
  p.softmax_scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = I("causal") != 0;
  const int64_t window = I("window");
  p.window = window <= 0 ? 0
                         : static_cast<int>(std::min<int64_t>(
                               window, int64_t{thinkfuse::kFlashAttnMaxSeqlen} + 1));
  return p;
}

cudaError_t run_fwd() {
  thinkfuse::FlashAttnParams p = attention_params();
  if (I("k_empty")) p.k = p.v = p.q;  // as the forward binding: no key token at all
  return thinkfuse::flash_attention_forward(p, dtype(S("dtype")), nullptr);
}

// The Hopper kernel, as csrc/bindings/flash_attention_sm90.cpp calls it (the Python side copies
// inputs without 16-byte rows first and retries with contiguous ones on cudaErrorInvalidPitchValue).
cudaError_t run_fwd_sm90() {
  thinkfuse::FlashAttnParams p = attention_params();
  if (I("k_empty")) p.k = p.v = p.q;
  const cudaError_t err = thinkfuse::flash_attention_forward_sm90(p, dtype(S("dtype")), nullptr);
  g_result << "named_barrier_leftovers " << emu::named_barrier_leftovers() << "\n";
  return err;
}

// The backward, as csrc/bindings/flash_attention_bwd.cpp calls it; `sm90`: the Hopper one
// (flash_attention_bwd_sm90, same binding code).
cudaError_t run_bwd(bool sm90) {
  const thinkfuse::FlashAttnParams p = attention_params();
  thinkfuse::FlashAttnBwdArgs a;
  a.dout = at("dout", I("do_off"), 2);
  a.do_batch_stride = I("do_bs"), a.do_seq_stride = I("do_ss"), a.do_head_stride = I("do_hs");
  if (I("has_dlse")) {
    a.dlse = static_cast<const float*>(at("dlse", 0, 4));
    a.dlse_batch_stride = I("dlse_bs"), a.dlse_head_stride = I("dlse_hs");
  }
  a.dq = at("dq", 0, 2);
  a.dk = at("dk", 0, 2);
  a.dv = at("dv", 0, 2);
  // Workspaces as the binding allocates them (uninitialised there: poisoned here).
  const int64_t rows_q = I("rows_q");
  const int64_t pairs = rows_q * p.heads_q;
  a.dq_accum = reinterpret_cast<float*>(scratch("dq_accum", pairs * p.head_dim * 4, 0xFF).data);
  a.lse_log2 = reinterpret_cast<float*>(scratch("stats", 2 * pairs * 4, 0xFF).data);
  a.delta = a.lse_log2 + pairs;
  if (!sm90) return thinkfuse::flash_attention_backward(p, a, dtype(S("dtype")), nullptr);
  const cudaError_t err = thinkfuse::flash_attention_backward_sm90(p, a, dtype(S("dtype")), nullptr);
  g_result << "named_barrier_leftovers " << emu::named_barrier_leftovers() << "\n";
  return err;
}

cudaError_t run_decode() {
  const thinkfuse::DType dt = dtype(S("dtype"));
  const int e = elem_size(dt);
  const thinkfuse::DecodeAttentionShape shape{I("batch"),    I("seqlen_q"), I("q_heads"),
                                              I("kv_heads"), I("head_dim"), I("max_seqlen_k")};
  const thinkfuse::HeadsView q{at("q", I("q_off"), e), shape.q_heads, I("q_sb"), I("q_ss"), I("q_sh")};
  const thinkfuse::HeadsView k{at("k", I("k_off"), e), shape.kv_heads, I("k_sb"), I("k_ss"), I("k_sh")};
  const thinkfuse::HeadsView v{at("v", I("v_off"), e), shape.kv_heads, I("v_sb"), I("v_ss"), I("v_sh")};
  const int64_t splits = thinkfuse::decode_attention_num_splits(shape, I("requested_splits"), dt);
  g_result << "splits " << splits << "\n";
  if (splits < 1) return cudaErrorInvalidValue;
  float* o_part = nullptr;
  float* lse_part = nullptr;
  if (splits > 1) {
    const int64_t rows = shape.batch * splits * shape.q_heads * shape.seqlen_q;
    o_part = reinterpret_cast<float*>(scratch("o_part", rows * shape.head_dim * 4, 0xFF).data);
    lse_part = reinterpret_cast<float*>(scratch("lse_part", rows * 4, 0xFF).data);
  }
  const int32_t* leftpad =
      I("has_leftpad", 0) != 0 ? static_cast<const int32_t*>(at("leftpad", 0, 4)) : nullptr;
  return thinkfuse::decode_attention(shape, q, k, v, static_cast<const int32_t*>(at("seqlens", 0, 4)),
                                     leftpad, static_cast<float>(F("scale")), I("window"), splits, o_part,
                                     lse_part, at("out", 0, e), dt, nullptr);
}

cudaError_t run_mtp() {
  const thinkfuse::DType logits_dt = dtype(S("logits_dtype"));
  const thinkfuse::DType probs_dt = dtype(S("probs_dtype"));
  const int64_t batch = I("batch"), k = I("k"), vocab = I("vocab");
  const bool sampled = F("temperature") > 0.0;
  const int64_t splits = thinkfuse::mtp_verify_splits(batch, k, vocab, sampled,
                                                      I("num_splits"), I("sm_count"));
  g_result << "splits " << splits << "\n";
  const int64_t ws_bytes = thinkfuse::mtp_verify_workspace_bytes(batch, k, splits, sampled);
  // Workspace contents are irrelevant (the launch zeroes its counters): poison them.
  void* workspace = splits > 0 ? scratch("workspace", ws_bytes, 0xFF).data : nullptr;
  const bool has_probs = I("has_probs") != 0;
  return thinkfuse::mtp_verify(
      static_cast<const int64_t*>(at("draft", 0, 8)),
      at("logits", I("logits_off"), elem_size(logits_dt)), I("stride_lb"), I("stride_lk"),
      has_probs ? at("probs", I("probs_off"), elem_size(probs_dt)) : nullptr, I("stride_pb", 0),
      I("stride_pk", 0), sampled ? static_cast<const float*>(at("uniforms", 0, 4)) : nullptr,
      static_cast<int64_t*>(at("tokens", 0, 8)), static_cast<int64_t*>(at("num_accepted", 0, 8)),
      batch, k, vocab, static_cast<float>(F("temperature")), logits_dt, probs_dt, splits, workspace,
      ws_bytes, nullptr);
}

// --- token log-probabilities, as csrc/bindings/logprobs.cpp ------------------------------------

// 1 / T in double, then float32 (the binding's inverse_temperature).
float inverse_temperature() { return static_cast<float>(1.0 / F("temperature")); }

cudaError_t run_logprobs_fwd() {
  const thinkfuse::DType dt = dtype(S("dtype"));
  const bool ids_int64 = I("ids_int64") != 0;
  const bool entropy = I("entropy") != 0;
  return thinkfuse::token_logprobs_forward(
      view("logits", elem_size(dt)), I("stride_b"), I("stride_s"), I("seq_len"),
      view("ids", ids_int64 ? 8 : 4), ids_int64, view_as<float>("logprobs"),
      entropy ? view_as<float>("entropy") : nullptr, view_as<float>("lse"), I("rows"), I("vocab"),
      inverse_temperature(), dt, nullptr);
}

// token_logprobs_bwd (grad_logits a fresh buffer) and token_logprobs_bwd_out (grad_logits given:
// possibly the logits' own buffer, in place).
cudaError_t run_logprobs_bwd() {
  const thinkfuse::DType dt = dtype(S("dtype"));
  const bool ids_int64 = I("ids_int64") != 0;
  const bool d_entropy = I("grad_entropy") != 0;
  return thinkfuse::token_logprobs_backward(
      view_as<float>("grad_logprobs"), d_entropy ? view_as<float>("grad_entropy") : nullptr,
      view("logits", elem_size(dt)), I("stride_b"), I("stride_s"), I("seq_len"),
      view("ids", ids_int64 ? 8 : 4), ids_int64, view_as<float>("lse"),
      d_entropy ? view_as<float>("entropy") : nullptr, view("grad_logits", elem_size(dt)),
      I("rows"), I("vocab"), inverse_temperature(), dt, nullptr);
}

// --- RMSNorm, as csrc/bindings/rms_norm.cpp ------------------------------------------------------

cudaError_t run_rms_fwd() {
  const thinkfuse::DType xd = dtype(S("x_dtype")), wd = dtype(S("w_dtype"));
  const thinkfuse::DType yd = xd == wd ? xd : thinkfuse::DType::kFloat32;
  const bool residual = I("residual") != 0;
  return thinkfuse::rms_norm_forward(
      view("x", elem_size(xd)), I("x_rs"), residual ? view("residual", elem_size(xd)) : nullptr,
      residual ? I("residual_rs") : 0, view("weight", elem_size(wd)), view("y", elem_size(yd)),
      residual ? view("h", elem_size(xd)) : nullptr, view_as<float>("rstd"), I("rows"), I("cols"),
      static_cast<float>(F("eps")), xd, wd, nullptr);
}

cudaError_t run_rms_bwd() {
  const thinkfuse::DType xd = dtype(S("x_dtype")), wd = dtype(S("w_dtype"));
  const thinkfuse::DType yd = xd == wd ? xd : thinkfuse::DType::kFloat32;
  const int64_t cols = I("cols");
  // The dweight workspace as the binding allocates it (uninitialised there: poisoned here).
  const int64_t floats = thinkfuse::rms_norm_backward_workspace_floats(cols, emu::current_device());
  g_result << "workspace_floats " << floats << "\n";
  if (floats < 0) bad_case("rms_norm_backward_workspace_floats failed");
  float* workspace =
      floats > 0 ? reinterpret_cast<float*>(scratch("workspace", floats * 4, 0xFF).data) : nullptr;
  const bool dh = I("dh") != 0;
  return thinkfuse::rms_norm_backward(
      view("dy", elem_size(yd)), I("dy_rs"), view("h", elem_size(xd)), I("h_rs"),
      view("weight", elem_size(wd)), view_as<float>("rstd"),
      dh ? view("dh", elem_size(xd)) : nullptr, view("dx", elem_size(xd)), view("dw", elem_size(wd)),
      workspace, I("rows"), cols, xd, wd, nullptr);
}

// --- rotary embeddings, as csrc/bindings/rope.cpp ------------------------------------------------

thinkfuse::RotaryShape rotary_shape() { return {I("batch"), I("seq"), I("head_dim")}; }

thinkfuse::HeadsView heads(const std::string& name, int elem) {
  return {view(name, elem), I(name + "_heads"), I(name + "_sb"), I(name + "_ss"), I(name + "_sh")};
}

// rope_fwd / rope_bwd (backward 1: q / k are the output gradients, the outputs dq / dk).
cudaError_t run_rope() {
  const thinkfuse::DType dt = dtype(S("dtype"));
  const int e = elem_size(dt);
  const bool pos_int64 = I("pos_int64") != 0;
  const thinkfuse::PositionsView positions{view("pos", pos_int64 ? 8 : 4), pos_int64, I("pos_sb"),
                                           I("pos_ss")};
  const auto launch = I("backward") ? &thinkfuse::rope_backward : &thinkfuse::rope_forward;
  return launch(rotary_shape(), heads("q", e), heads("k", e), positions, view_as<float>("inv_freq"),
                static_cast<float>(F("attention_scaling")), static_cast<float>(F("llama4_beta")),
                I("llama4_original_max"), view("q_out", e), view("k_out", e), dt, nullptr);
}

cudaError_t run_apply_rotary() {
  const thinkfuse::DType in = dtype(S("in_dtype"));
  const thinkfuse::DType cs = dtype(S("cos_dtype"));
  const thinkfuse::DType out = dtype(S("out_dtype"));
  const thinkfuse::CosSinView cos_sin{view("cos", elem_size(cs)), view("sin", elem_size(cs)),
                                      I("cos_sb"), I("cos_ss"), I("sin_sb"), I("sin_ss")};
  const auto launch =
      I("backward") ? &thinkfuse::apply_rotary_backward : &thinkfuse::apply_rotary_forward;
  return launch(rotary_shape(), heads("q", elem_size(in)), heads("k", elem_size(in)), cos_sin,
                view("q_out", elem_size(out)), view("k_out", elem_size(out)), in, cs, out, nullptr);
}

// --- SwiGLU, as csrc/bindings/swiglu.cpp (split and fused forms differ only in the views) ------

cudaError_t run_swiglu_fwd() {
  const thinkfuse::DType dt = dtype(S("dtype"));
  const int e = elem_size(dt);
  return thinkfuse::swiglu_forward(view("gate", e), I("gate_rs"), view("up", e), I("up_rs"),
                                   view("y", e), I("y_rs"), I("rows"), I("cols"), dt, nullptr);
}

cudaError_t run_swiglu_bwd() {
  const thinkfuse::DType dt = dtype(S("dtype"));
  const int e = elem_size(dt);
  return thinkfuse::swiglu_backward(view("dy", e), I("dy_rs"), view("gate", e), I("gate_rs"),
                                    view("up", e), I("up_rs"), view("dgate", e), I("dgate_rs"),
                                    view("dup", e), I("dup_rs"), I("rows"), I("cols"), dt, nullptr);
}

std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) bad_case("cannot read " + path);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  if (!f) bad_case("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CASE_DIR\n", argv[0]);
    return 2;
  }
  g_dir = argv[1];
  {
    std::ifstream f(g_dir + "/case.txt");
    if (!f) bad_case("cannot read " + g_dir + "/case.txt");
    std::string line;
    while (std::getline(f, line)) {
      const size_t sp = line.find(' ');
      if (line.empty()) continue;
      g_kv[line.substr(0, sp)] = sp == std::string::npos ? "" : line.substr(sp + 1);
    }
  }
  emu::Options& o = emu::options();
  o.seed = static_cast<uint64_t>(I("seed", 1));
  const std::string copies = has("copies") ? S("copies") : "late";
  o.copies = copies == "early" ? emu::CopyPolicy::kEarly
             : copies == "random" ? emu::CopyPolicy::kRandom
                                  : emu::CopyPolicy::kLate;
  o.sched = has("sched") && S("sched") == "random" ? emu::Sched::kRandom : emu::Sched::kWarp;
  o.workers = static_cast<int>(I("workers", 1));
  o.shuffle_blocks = I("shuffle_blocks", 1) != 0;
  o.yield_prob = has("yield_prob") ? F("yield_prob") : 0.05;
  o.verbose = I("verbose", 0) != 0;
  o.kernel_regs = static_cast<int>(I("kernel_regs", 168));
  o.smem_window_base = static_cast<int>(I("smem_window_base", -1));
  if (cudaSetDevice(static_cast<int>(I("device", 0))) != cudaSuccess) bad_case("device");

  for (const std::string& name : words(has("buffers") ? S("buffers") : "")) {
    const std::vector<unsigned char> bytes = read_file(g_dir + "/" + name + ".bin");
    auto b = std::make_unique<Buffer>();
    b->allocate(name, bytes.size());
    if (!bytes.empty()) std::memcpy(b->data, bytes.data(), bytes.size());
    g_buffers[name] = std::move(b);
  }

  const std::string op = S("op");
  cudaError_t status;
  if (op == "fwd") {
    status = run_fwd();
  } else if (op == "fwd_sm90") {
    status = run_fwd_sm90();
  } else if (op == "bwd") {
    status = run_bwd(false);
  } else if (op == "bwd_sm90") {
    status = run_bwd(true);
  } else if (op == "decode") {
    status = run_decode();
  } else if (op == "mtp") {
    status = run_mtp();
  } else if (op == "logprobs_fwd") {
    status = run_logprobs_fwd();
  } else if (op == "logprobs_bwd") {
    status = run_logprobs_bwd();
  } else if (op == "rms_fwd") {
    status = run_rms_fwd();
  } else if (op == "rms_bwd") {
    status = run_rms_bwd();
  } else if (op == "rope") {
    status = run_rope();
  } else if (op == "apply_rotary") {
    status = run_apply_rotary();
  } else if (op == "swiglu_fwd") {
    status = run_swiglu_fwd();
  } else if (op == "swiglu_bwd") {
    status = run_swiglu_bwd();
  } else {
    bad_case("unknown op " + op);
  }

  int exit_code = 0;
  for (const auto& [name, b] : g_buffers) {
    if (!b->guards_intact()) {
      std::fprintf(stderr, "harness: the guard bytes around buffer '%s' were overwritten\n",
                   name.c_str());
      exit_code = 4;
    }
  }
  for (const std::string& name : words(has("outputs") ? S("outputs") : "")) {
    const Buffer& b = buffer(name);
    write_file(g_dir + "/" + name + ".out.bin", b.data, b.bytes);
  }
  for (const emu::LaunchRecord& l : emu::launches()) {
    std::string kernel = l.kernel;
    for (char& ch : kernel) {
      if (ch == ' ') ch = '_';
    }
    g_result << "launch " << kernel << " " << l.grid.x << " " << l.grid.y << " " << l.grid.z << " "
             << l.block.x * l.block.y * l.block.z << " " << l.smem << "\n";
  }
  g_result << "status " << static_cast<int>(status) << "\n";
  const std::string result = g_result.str();
  write_file(g_dir + "/result.txt", result.data(), result.size());
  return exit_code;
}
