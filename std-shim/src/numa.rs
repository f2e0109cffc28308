//! FFI: the NUMA node of host memory, by `get_mempolicy(2)`. Called when a
//! region is registered over several rails, never on a transfer's path.

/// `MPOL_F_NODE` of `<linux/mempolicy.h>`: return a node, not a policy.
const MPOL_F_NODE: libc::c_ulong = 1;
/// `MPOL_F_ADDR`: of the page at `addr`.
const MPOL_F_ADDR: libc::c_ulong = 2;

/// The NUMA node of the page holding `addr` in this process (the kernel
/// faults it in if it was not), or `None` when the kernel does not say
/// (no NUMA support, an address not mapped, a seccomp filter).
pub(crate) fn node_of(addr: u64) -> Option<u32> {
    let mut node: libc::c_int = -1;
    // SAFETY: get_mempolicy writes one c_int to `node`, a valid local; the
    // node mask pointer is null with a max node of 0, so nothing else is
    // written. With MPOL_F_ADDR the kernel only looks `addr` up in this
    // process's page tables (an unmapped address is EFAULT, not a fault),
    // so any value of `addr` is sound.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut node as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_ulong>(),
            0 as libc::c_ulong,
            addr as usize as *mut libc::c_void,
            MPOL_F_NODE | MPOL_F_ADDR,
        )
    };
    if rc != 0 {
        return None;
    }
    u32::try_from(node).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_memory_is_on_an_online_node() {
        let buf = vec![1u8; 1 << 20];
        let node = super::node_of(buf.as_ptr() as u64).expect("get_mempolicy");
        // "0", "0-1", "0,2-3": the node is one of them.
        let online = std::fs::read_to_string("/sys/devices/system/node/online").unwrap();
        let on = online.trim().split(',').any(|r| match r.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).contains(&node),
            None => r.parse::<u32>().unwrap() == node,
        });
        assert!(on, "node {node} is not online ({online:?})");
        // Address 0 is not mapped: no node.
        assert_eq!(super::node_of(0), None);
    }
}
