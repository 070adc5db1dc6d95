//! CPUID the guest sees: what KVM supports, filtered through a named template.

use kvm_bindings::kvm_cpuid_entry2;

/// A named CPU template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuTemplate {
    /// Everything KVM supports.
    Host,
    /// Hides features whose instructions a nested PVM hypervisor's instruction
    /// emulator cannot execute at guest CPL0 (XSAVE family, POPCNT, SMAP/SMEP, AVX,
    /// …). Measured on a kvm_pvm host: the guest's CPUID instruction ignores this for
    /// the feature leaves (1 ECX, 7 EBX: it returns the host's bits), while the
    /// hypervisor leaves and leaf 1 EBX are the VMM's; so the VMM also passes
    /// [`pvm_kernel_args`] to a Linux kernel. See docs/pvm.md.
    Pvm,
}

impl CpuTemplate {
    /// The template's name.
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Pvm => "pvm",
        }
    }
}

/// Bits cleared by [`CpuTemplate::Pvm`]: (leaf, subleaf or None for all, register, mask).
const PVM_HIDDEN: &[(u32, Option<u32>, Reg, u32)] = &[
    // leaf 1 ECX: PCLMULQDQ, SSSE3.. no: keep SSE up to SSE3 for userspace; hide what the
    // kernel patches in or uses itself: PCID(17), SSE4.1(19), SSE4.2(20), MOVBE(22),
    // POPCNT(23), AES(25), XSAVE(26), OSXSAVE(27), AVX(28), F16C(29), RDRAND(30).
    (
        1,
        None,
        Reg::Ecx,
        1 << 1
            | 1 << 17
            | 1 << 19
            | 1 << 20
            | 1 << 22
            | 1 << 23
            | 1 << 25
            | 1 << 26
            | 1 << 27
            | 1 << 28
            | 1 << 29
            | 1 << 30,
    ),
    // leaf 7.0 EBX: FSGSBASE(0), BMI1(3), AVX2(5), SMEP(7), BMI2(8), ERMS(9), INVPCID(10),
    // RDSEED(18), ADX(19), SMAP(20), AVX512*(16,17,21,26-31), SHA(29).
    (
        7,
        Some(0),
        Reg::Ebx,
        1 | 1 << 3
            | 1 << 5
            | 1 << 7
            | 1 << 8
            | 1 << 9
            | 1 << 10
            | 1 << 16
            | 1 << 17
            | 1 << 18
            | 1 << 19
            | 1 << 20
            | 1 << 21
            | 0xfc00_0000,
    ),
    // leaf 7.0 ECX: UMIP(2), PKU(3), OSPKE(4), AVX512/VAES/GFNI family.
    (7, Some(0), Reg::Ecx, 1 << 2 | 1 << 3 | 1 << 4 | 0x0000_7f42),
    // leaf 0x80000001 ECX: LZCNT(5), SSE4A(6), 3DNowPrefetch(8).
    (0x8000_0001, None, Reg::Ecx, 1 << 5 | 1 << 6 | 1 << 8),
    // leaf 0x80000001 EDX: 1 GiB pages(26), RDTSCP(27).
    (0x8000_0001, None, Reg::Edx, 1 << 26 | 1 << 27),
];

#[derive(Debug, Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// Applies `template` and the per-vCPU fields (APIC id, CPU count, hypervisor bit).
///
/// `tsc_deadline`: KVM emulates the local APIC's TSC-deadline timer mode
/// (KVM_CAP_TSC_DEADLINE_TIMER), which KVM_GET_SUPPORTED_CPUID never reports (leaf 1
/// ECX bit 24 is the VMM's to set). A guest that sees it arms its timer with one MSR
/// write instead of APIC MMIO, and Linux then needs no PIT: it skips setting one up
/// and checking that its interrupt arrives through the IO-APIC (`check_timer`), which
/// on a nested test host cost most of a second of boot (docs/startup.md).
pub fn apply(
    entries: &mut [kvm_cpuid_entry2],
    template: CpuTemplate,
    vcpu: u8,
    cpus: u8,
    tsc_deadline: bool,
) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // Initial APIC id, logical processor count; hypervisor present.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(vcpu) << 24) | (u32::from(cpus) << 16);
                e.ecx |= 1 << 31;
                if tsc_deadline {
                    e.ecx |= 1 << 24;
                }
            }
            0xb => e.edx = u32::from(vcpu),
            _ => {}
        }
        if template == CpuTemplate::Pvm {
            for (leaf, sub, reg, mask) in PVM_HIDDEN {
                if e.function == *leaf && sub.is_none_or(|s| s == e.index) {
                    match reg {
                        Reg::Ebx => e.ebx &= !mask,
                        Reg::Ecx => e.ecx &= !mask,
                        Reg::Edx => e.edx &= !mask,
                    }
                }
            }
            if e.function == 0xd {
                // No XSAVE: no XSAVE state components.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
        }
    }
}

/// Kernel arguments the VMM adds on a nested PVM host (docs/pvm.md). They, not the CPU
/// template, keep the guest kernel off instructions the host cannot run: there the
/// guest's CPUID instruction returns the host CPU's own feature bits (KVM_SET_CPUID2 is
/// not consulted for leaves 1 and 7; measured with a probe guest at CPL0 and CPL3), so a
/// kernel only avoids a feature it is told to clear. `noxsave`: XRSTOR/XSAVE are not emulated. Only one
/// `clearcpuid=` list counts. `fsrm` goes with `erms`: memmove's "FSRM implies ERMS"
/// alternative otherwise drops its small-copy length check and the first short memmove
/// runs away over memory (seen as an endless page fault on the per-CPU area).
/// `syscall_via_fault` turns on hostd's guest kernel patch that completes system calls
/// this host leaves half done (guest/kernel/patches/0001-…); `no_init_poison` skips
/// filling freed init memory, 14% of an emulated boot (0002-…); other kernels ignore
/// both.
const PVM_KERNEL_ARGS: &str = "syscall_via_fault no_init_poison noxsave clearcpuid=pcid,popcnt,xsave,avx,avx2,smep,smap,invpcid,fsgsbase,rdrand,rdseed,bmi1,bmi2,erms,fsrm,pku,umip";

/// [`PVM_KERNEL_ARGS`], plus `nopv` for more than one vCPU: the guest sees KVM's PV
/// feature leaf (0x40000001, as KVM_GET_SUPPORTED_CPUID offers it), so it sends IPIs by
/// hypercall (KVM_HC_SEND_IPI), and a
/// non-PVM guest's VMCALL never completes on these hosts: secondary CPUs never came
/// up (vCPU 0 stuck in `kvm_hypercall4`, vCPU 1 in `queued_spin_lock_slowpath`).
/// `nopv` makes the guest ignore the hypervisor's PV features. With one vCPU nothing
/// sends IPIs and `nopv` only costs boot time (1.4 s: no kvmclock, TSC calibrated).
pub fn pvm_kernel_args(vcpus: u8) -> String {
    if vcpus > 1 {
        format!("{PVM_KERNEL_ARGS} nopv")
    } else {
        PVM_KERNEL_ARGS.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_kernel_args_add_nopv_only_for_smp() {
        assert!(
            pvm_kernel_args(1).starts_with("syscall_via_fault no_init_poison noxsave clearcpuid=")
        );
        assert!(!pvm_kernel_args(1).contains("nopv"));
        assert!(pvm_kernel_args(2).ends_with(" nopv"));
    }

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    #[test]
    fn pvm_template_hides_xsave_popcnt_smap() {
        let mut e = vec![entry(1, 0), entry(7, 0), entry(7, 1), entry(0xd, 0)];
        apply(&mut e, CpuTemplate::Pvm, 3, 4, true);
        assert_eq!(e[0].ecx & (1 << 26 | 1 << 23), 0, "xsave/popcnt");
        assert_ne!(e[0].ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[1].ebx & (1 << 20 | 1 << 7), 0, "smap/smep");
        assert_eq!(e[2].ebx, !0, "subleaf 1 untouched");
        assert_eq!((e[3].eax, e[3].ebx), (0, 0));
        let mut h = vec![entry(7, 0)];
        apply(&mut h, CpuTemplate::Host, 0, 1, false);
        assert_eq!(h[0].ebx, !0);
    }

    #[test]
    fn tsc_deadline_is_offered_only_when_kvm_emulates_it() {
        let mut e = vec![entry(1, 0)];
        e[0].ecx = 0;
        apply(&mut e, CpuTemplate::Host, 0, 1, false);
        assert_eq!(e[0].ecx & (1 << 24), 0);
        apply(&mut e, CpuTemplate::Host, 0, 1, true);
        assert_ne!(e[0].ecx & (1 << 24), 0);
    }
}
