"""Session 17: the functional all-gather on gloo + CUDA, with and without tests/gloo_cuda_shim.py."""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
case = sys.argv[1]
torch.cuda.set_device(0)
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
name = dist.group.WORLD.group_name
x = torch.full((8, 4), float(r + 1), device="cuda", dtype=torch.bfloat16)
F = torch.ops._c10d_functional
if "patched" in case:
    import gloo_cuda_shim
    gloo_cuda_shim.install()
if case == "f_ag_out":
    y = torch.empty(8 * w, 4, device="cuda", dtype=x.dtype)
    F.all_gather_into_tensor_out(x, w, name, out=y); F.wait_tensor(y)
elif case.startswith("f_ag"):
    y = F.wait_tensor(F.all_gather_into_tensor(x, w, name))
elif case.startswith("compiled_ag"):
    fn = torch.compile(lambda t: F.wait_tensor(F.all_gather_into_tensor(t * 2, w, name)) + 1)
    y = fn(x)
torch.cuda.synchronize()
print("OK", case, r, y[::8, 0].tolist(), flush=True)
dist.destroy_process_group()
