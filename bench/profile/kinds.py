"""Where the CPU goes, by kind of work, from a whole-system profile.

usage: kinds.py FOLDED GBIT_PER_S SECONDS
       kinds.py FOLDED --per-op CLIENT_US AGENT_US SERVER_US

(folded stacks from inferno-collapse-perf.) The first form, for a bulk run: CPU seconds per GB,
from the rate the bench reported and the seconds perf recorded; the machine's CPU count comes
from os.cpu_count(). The second, for round trips and new connections: each process's share of
its own samples by kind, times the CPU microseconds per operation the bench measured for it
(its table "CPU per operation"), so the kinds add up to the measured figure.

Each sample goes to the first kind its stack matches from the leaf up; samples taken with
interrupts off land on the spin unlock that ends them and go to their caller's kind.
"""
import sys, collections, re, os
f=sys.argv[1]; per_op=len(sys.argv)>2 and sys.argv[2]=='--per-op'
if not per_op:
    gbit=float(sys.argv[2]); secs=float(sys.argv[3])
ncpu=os.cpu_count() or 1
rules=[
 ('idle', r'pv_native_safe_halt|cpuidle|do_idle'),
 ('crypto (AES-GCM)', r'aesni|ghash|gcm_|aes_hw|ring_core.*(aes|gcm)|ChaCha|aws_lc'),
 ('copies', r'rep_movs_alternative|memcpy|memmove|_copy_to_iter|_copy_from_iter|copy_user|copy_page|copy_nonoverlapping|skb_copy_datagram|append_elements'),
 ('memset/zeroing', r'memset|clear_page|write_bytes|alloc_zeroed'),
 ('allocator', r'malloc|_int_free|cfree|libc_free|__rust_alloc|__rust_dealloc|realloc|arena|mmap|munmap|brk|alloc_pages|__alloc_frozen|free_pages|folio|page_fault|exc_page_fault'),
 ('quinn (packets, frames, acks)', r'quinn_proto|quinn::|quinn_udp'),
 ('yamux', r'yamux'),
 ('rustls (records)', r'rustls'),
 ('scheduling, wake-ups', r'schedule|finish_task_switch|try_to_wake_up|futex|ep_poll|epoll|wake_up|select_task_rq|enqueue_task|dequeue_task|pick_next|__switch_to|ttwu|irqentry_exit|sysvec|reschedule'),
 ('kernel network stack', r'tcp_|udp_|udpv6|__udp|ip_|ipv4|__ip|inet_|__inet|dev_queue|netif|skb|sock_|__sock|sk_|net_rx|__netif|loopback|napi|____sys_|__sys_send|__sys_recv|sendmsg|recvmsg|do_recvmmsg|__sys_sendmmsg|sys_sendto|sys_recvfrom|sock_write|sock_read|__kfree_skb|kfree_skb|gro|gso|nf_|dst_'),
 ('tokio', r'tokio::|mio::'),
 ('tether', r'tether_'),
 ('syscall entry/exit', r'entry_SYSCALL|do_syscall|syscall_exit|__x64_sys|fdget|__fget'),
]
rx=[(k,re.compile(p)) for k,p in rules]
def kind(fr):
    for x in reversed(fr[1:]):
        if x in ('_raw_spin_unlock_irqrestore','_raw_spin_unlock_irq','_raw_spin_unlock','_raw_spin_lock'): continue
        for k,r in rx:
            if r.search(x): return k
    return 'other'
bycomm=collections.defaultdict(collections.Counter); total=0
for line in open(f):
    stack,_,n=line.rstrip().rpartition(' '); n=int(n); total+=n
    fr=stack.split(';')
    c=fr[0]
    if c.startswith('tokio-rt') or c.startswith('tether-server'): c='server'
    elif c.startswith('tether-agent'): c='agent'
    elif c.startswith('swapper'): c='idle'
    else: c='bench and other'
    bycomm[c][kind(fr)]+=n
kinds=[k for k,_ in rules]+['other']
if per_op:
    us={'bench and other':float(sys.argv[3]),'agent':float(sys.argv[4]),'server':float(sys.argv[5])}
    print("| kind | client and upstream us | agent us | server us | all |"); print("|---|---|---|---|---|")
    col={c:sum(n for k,n in bycomm[c].items() if k!='idle') or 1 for c in us}
    tot=collections.Counter()
    for k in kinds:
        if k=='idle': continue
        v=[bycomm[c][k]/col[c]*us[c] for c in ('bench and other','agent','server')]
        for c,x in zip(('bench and other','agent','server'),v): tot[c]+=x
        if sum(v)>=0.05: print(f"| {k} | {v[0]:.1f} | {v[1]:.1f} | {v[2]:.1f} | {sum(v):.1f} |")
    t=[tot[c] for c in ('bench and other','agent','server')]
    print(f"| **all** | **{t[0]:.1f}** | **{t[1]:.1f}** | **{t[2]:.1f}** | **{sum(t):.1f}** |")
    sys.exit(0)
gb=gbit*secs/8
cpu_s=ncpu*secs
print(f"samples over {cpu_s} CPU-s, {gb:.2f} GB moved")
print("| kind | agent s/GB | server s/GB | both |"); print("|---|---|---|---|")
ta=ts=0
for k in kinds:
    a=bycomm['agent'][k]/total*cpu_s/gb; s=bycomm['server'][k]/total*cpu_s/gb
    ta+=a; ts+=s
    if a+s>=0.005: print(f"| {k} | {a:.2f} | {s:.2f} | {a+s:.2f} |")
print(f"| **all** | **{ta:.2f}** | **{ts:.2f}** | **{ta+ts:.2f}** |")
for c in ('idle','bench and other'):
    print(c, f"{sum(bycomm[c].values())/total*100:.1f}% of samples")
