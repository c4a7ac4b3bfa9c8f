import os, sys, torch, torch.distributed as dist
import torch.distributed._functional_collectives as fc
op, dt = sys.argv[1], getattr(torch, sys.argv[2])
torch.cuda.set_device(0)
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
x = torch.full((8, 4), float(r + 1), device="cuda", dtype=dt)
g = dist.group.WORLD
if op == "all_reduce":
    y = x.clone(); dist.all_reduce(y)
elif op == "f_all_reduce":
    y = fc.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", g.group_name))
elif op == "all_gather_into":
    y = torch.empty(8 * w, 4, device="cuda", dtype=dt); dist.all_gather_into_tensor(y, x)
elif op == "f_all_gather":
    y = fc.wait_tensor(torch.ops._c10d_functional.all_gather_into_tensor(x, w, g.group_name))
elif op == "reduce_scatter":
    y = torch.empty(8 // w, 4, device="cuda", dtype=dt); dist.reduce_scatter_tensor(y, x)
elif op == "f_reduce_scatter":
    y = fc.wait_tensor(torch.ops._c10d_functional.reduce_scatter_tensor(x, "sum", w, g.group_name))
torch.cuda.synchronize()
print("OK", op, dt, r, y.flatten()[:3].tolist(), flush=True)
dist.destroy_process_group()
