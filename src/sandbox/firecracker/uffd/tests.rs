//! The fault path against the real kernel: this process creates a
//! userfaultfd over an anonymous mapping (as Firecracker does over guest
//! memory), hands it over through [`receive`] on a Unix socket, and reads
//! the mapping while the fault thread serves it from a memory file.

use super::*;
use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;

/// `UFFDIO_API` and `UFFDIO_REGISTER` (Firecracker makes these calls; the test does too).
const UFFDIO_API: u64 = ioc(IOC_READ_WRITE, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(IOC_READ_WRITE, 0x00, 32);
const UFFD_FEATURE_EVENT_REMOVE: u64 = 0x8;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 0x1;

#[test]
fn ioctl_numbers_match_the_kernel_headers() {
    // Values of <linux/userfaultfd.h> on x86_64 (checked with a C program).
    assert_eq!(UFFDIO_API, 0xc018_aa3f);
    assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
    assert_eq!(
        ioc(2, 0x02, 16),
        0x8010_aa02,
        "UFFDIO_WAKE, a read-only one"
    );
    assert_eq!(UFFDIO_COPY, 0xc028_aa03);
    assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
    assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    assert_eq!(std::mem::size_of::<UffdioCopy>(), 40);
    assert_eq!(std::mem::size_of::<UffdioZeropage>(), 32);
}

#[test]
fn region_lists_are_checked_against_the_memory_file() {
    let one = br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
    assert_eq!(
        parse_regions(one, 8192).unwrap(),
        [Span {
            base: 4096,
            size: 8192,
            offset: 0
        }]
    );
    assert!(parse_regions(one, 4096)
        .unwrap_err()
        .contains("does not fit"));
    let huge = br#"[{"base_host_virt_addr":0,"size":2097152,"offset":0,"page_size":2097152}]"#;
    assert!(parse_regions(huge, 1 << 30).unwrap_err().contains("4 KiB"));
    assert!(parse_regions(b"[]", 0).is_err());
    assert!(parse_regions(b"[{", 0).is_err());
}

#[test]
fn zero_pages_are_told_apart() {
    let mut p = vec![0u8; PAGE_BYTES as usize + 1];
    assert!(is_zero(&p[1..]));
    p[PAGE_BYTES as usize] = 1;
    assert!(!is_zero(&p[1..]));
}

/// A (blocking) userfaultfd over `pages` fresh anonymous pages, or why none can be had.
fn userfaultfd_over(pages: u64) -> Result<(OwnedFd, u64), String> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("userfaultfd: {}", io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor owned by nothing else.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut api = [0xAAu64, UFFD_FEATURE_EVENT_REMOVE, 0];
    // SAFETY: uffdio_api is three u64 (api, features, ioctls).
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, api.as_mut_ptr()) } != 0 {
        return Err(format!("UFFDIO_API: {}", io::Error::last_os_error()));
    }
    let len = (pages * PAGE_BYTES) as usize;
    // SAFETY: a new private anonymous mapping; checked below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    // uffdio_register: range (start, len), mode, ioctls (out).
    let mut reg = [addr as u64, len as u64, UFFDIO_REGISTER_MODE_MISSING, 0];
    // SAFETY: uffdio_register is four u64; the range is the mapping above.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, reg.as_mut_ptr()) } != 0 {
        return Err(format!("UFFDIO_REGISTER: {}", io::Error::last_os_error()));
    }
    Ok((uffd, addr as u64))
}

/// Sends `fd` and `bytes` in one message, as Firecracker does.
fn send_with_fd(s: &UnixStream, fd: RawFd, bytes: &[u8]) {
    send_with_fds(s, &[fd], bytes)
}

/// Sends `fds` (at most 8) and `bytes` in one message.
fn send_with_fds(s: &UnixStream, fds: &[RawFd], bytes: &[u8]) {
    assert!(fds.len() <= 8);
    let n = 4 * fds.len() as u32;
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    // SAFETY: building a msghdr with one SCM_RIGHTS message inside `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(n) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(n) as usize;
        for (i, fd) in fds.iter().enumerate() {
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>().add(i), *fd);
        }
        assert_eq!(libc::sendmsg(s.as_raw_fd(), &msg, 0), bytes.len() as isize);
    }
}

/// Page `i` of the test's memory file: every third page is zero, the rest
/// hold their index.
fn page_content(i: u64) -> Vec<u8> {
    if i % 3 == 1 {
        vec![0; PAGE_BYTES as usize]
    } else {
        (0..PAGE_BYTES)
            .map(|b| (b as u8) ^ (i as u8) ^ 0x5a)
            .collect()
    }
}

#[test]
fn guest_memory_is_served_from_the_file_with_a_prefetched_working_set() {
    const PAGES: u64 = 1024;
    let (uffd, base) = match userfaultfd_over(PAGES) {
        Ok(x) => x,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let dir = std::env::temp_dir().join(format!("hearth-uffd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mem_path = dir.join("fc.mem");
    let mut f = File::create(&mem_path).unwrap();
    for i in 0..PAGES {
        f.write_all(&page_content(i)).unwrap();
    }
    drop(f);
    let mem = Arc::new(Memory::open(&mem_path).unwrap());

    // The handover: the "VMM" (this process) connects and sends fd + regions.
    let sock = dir.join(UFFD_SOCK);
    let listener = UnixListener::bind(&sock).unwrap();
    let regions = format!(
        r#"[{{"base_host_virt_addr":{base},"size":{},"offset":0,"page_size":4096,"page_size_kib":4096}}]"#,
        PAGES * PAGE_BYTES
    );
    let vmm = UnixStream::connect(&sock).unwrap();
    send_with_fd(&vmm, uffd.as_raw_fd(), regions.as_bytes());
    drop(uffd);
    let deadline = Instant::now() + Duration::from_secs(5);
    let got = receive(
        &listener,
        std::process::id() as i32,
        mem.len(),
        deadline,
        || Ok(()),
    )
    .unwrap();
    assert_eq!(got.regions.len(), 1);

    // The working set (pages 0..8 and 20) goes in before the guest runs.
    let runs = [
        workset::Run { first: 0, pages: 8 },
        workset::Run {
            first: 20,
            pages: 1,
        },
    ];
    let installed = install(&got.uffd, &mem, &got.regions, &runs).unwrap();
    assert_eq!(installed, 9);
    let mut reg = register(got, mem.clone(), true).unwrap();

    // Every page reads as the file holds it, faulted in by the fault thread.
    let t = Instant::now();
    for i in 0..PAGES {
        let at = (base + i * PAGE_BYTES) as *const u8;
        // SAFETY: inside the mapping made above, which lives until the test ends.
        let page = unsafe { std::slice::from_raw_parts(at, PAGE_BYTES as usize) };
        assert!(page == page_content(i).as_slice(), "page {i}");
    }
    let per_fault_us = t.elapsed().as_secs_f64() * 1e6 / (PAGES - 9) as f64;
    eprintln!("uffd: {per_fault_us:.1} µs per lazily served fault (4 KiB, copy or zero page)");
    // The reader wakes as soon as its page is in; the count follows.
    let counted = Instant::now() + Duration::from_secs(5);
    while reg.faults() < PAGES - 9 && Instant::now() < counted {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(reg.faults(), PAGES - 9);
    let mut recorded = reg.stop_recording().unwrap();
    let recorded_runs = workset::runs_from_pages(&mut recorded);
    assert_eq!(
        recorded_runs,
        [
            workset::Run {
                first: 8,
                pages: 12
            },
            workset::Run {
                first: 21,
                pages: PAGES as u32 - 21
            }
        ],
        "the pages faulted, not those installed"
    );
    assert!(reg.stop_recording().is_none());

    // Memory the guest gives back (MADV_DONTNEED → UFFD_EVENT_REMOVE) reads as zeros.
    let at = base + 5 * PAGE_BYTES;
    // SAFETY: one page of the mapping above.
    let rc = unsafe { libc::madvise(at as *mut _, PAGE_BYTES as usize, libc::MADV_DONTNEED) };
    assert_eq!(rc, 0);
    // SAFETY: as above.
    let page = unsafe { std::slice::from_raw_parts(at as *const u8, PAGE_BYTES as usize) };
    assert!(is_zero(page), "a removed page is served as zeros");

    // The VMM exits: its connection hangs up and the guest's state is freed.
    let id = reg.id;
    drop(vmm);
    let gone = Instant::now() + Duration::from_secs(5);
    while server().unwrap().guests.lock().unwrap().contains_key(&id) {
        assert!(Instant::now() < gone, "guest state outlived its VMM");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(reg);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stranger_on_the_socket_is_refused() {
    let dir = std::env::temp_dir().join(format!("hearth-uffd-peer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join(UFFD_SOCK);
    let listener = UnixListener::bind(&sock).unwrap();
    let _peer = UnixStream::connect(&sock).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let err = receive(&listener, 1, 0, deadline, || Ok(())).err().unwrap();
    assert!(err.to_string().contains("not the VMM"), "{err}");
    // Nobody connects: the wait ends at its deadline, or when the VMM dies.
    let deadline = Instant::now() + Duration::from_millis(50);
    let err = receive(&listener, 1, 0, deadline, || Ok(())).err().unwrap();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    let err = receive(
        &listener,
        1,
        0,
        Instant::now() + Duration::from_secs(5),
        || Err(io::Error::other("vmm died")),
    )
    .err()
    .unwrap();
    assert_eq!(err.to_string(), "vmm died");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_lazy_fault_brings_in_the_rest_of_its_block() {
    const PAGES: u64 = 64;
    let (uffd, base) = match userfaultfd_over(PAGES) {
        Ok(x) => x,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let dir = std::env::temp_dir().join(format!("hearth-uffd-around-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mem_path = dir.join("fc.mem");
    let mut f = File::create(&mem_path).unwrap();
    for i in 0..PAGES {
        f.write_all(&page_content(i)).unwrap();
    }
    drop(f);
    let mem = Arc::new(Memory::open(&mem_path).unwrap());
    let (vmm, conn) = UnixStream::pair().unwrap();
    let got = Received {
        uffd,
        regions: vec![Span {
            base,
            size: PAGES * PAGE_BYTES,
            offset: 0,
        }],
        conn,
    };
    // Page 20 was installed (a working set): the block 16..32 fills around it.
    let one = [workset::Run {
        first: 20,
        pages: 1,
    }];
    assert_eq!(install(&got.uffd, &mem, &got.regions, &one).unwrap(), 1);
    let reg = register(got, mem, false).unwrap();
    let read = |i: u64| {
        let at = (base + i * PAGE_BYTES) as *const u8;
        // SAFETY: inside the mapping, which lives until the test ends.
        let page = unsafe { std::slice::from_raw_parts(at, PAGE_BYTES as usize) };
        assert!(
            page == page_content(i).as_slice(),
            "page {i}: {:?} vs {:?}",
            &page[..8],
            &page_content(i)[..8]
        );
    };
    read(5);
    // The reader is woken as soon as its page is in; the fault is counted
    // once the block around it is in too.
    let counted = Instant::now() + Duration::from_secs(5);
    while reg.faults() == 0 {
        assert!(Instant::now() < counted, "the fault was never counted");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(reg.faults(), 1);
    (0..16).for_each(read);
    // The block came with the first fault (seldom, about 1 run in 8 with the
    // other tests faulting in this process meanwhile, one more page faulted).
    assert!(reg.faults() <= 2, "{} faults for one block", reg.faults());
    // The other 48 pages (one installed): a fault per block and a few
    // around the installed page, not one per page.
    (16..PAGES).for_each(read);
    assert!(reg.faults() <= 10, "{} faults", reg.faults());
    drop(vmm);
    drop(reg);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Descriptors beyond the first in one message are closed, not leaked: a
/// pipe whose write end was passed three times reads end-of-file once the
/// one kept is dropped (before, the other two stayed open in hearth).
#[test]
fn extra_descriptors_in_a_message_are_closed() {
    let mut p = [0; 2];
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: pipe2 fills two descriptors on success.
    let r = unsafe { libc::pipe2(p.as_mut_ptr(), flags) };
    assert_eq!(r, 0);
    // SAFETY: both were just created and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    let (a, b) = UnixStream::pair().unwrap();
    let raw = w.as_raw_fd();
    send_with_fds(&a, &[raw, raw, raw], b"regions");
    drop(w);
    let mut buf = [0u8; 16];
    let (n, kept) = recv_with_fd(&b, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"regions");
    assert!(kept.is_some());
    drop(kept);
    // SAFETY: reads into a buffer we own.
    let got = unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), 1) };
    assert_eq!(
        got,
        0,
        "a write end is still open: {}",
        io::Error::last_os_error()
    );
}

/// The memory file is mapped only if it is a plain file reached without a
/// link (hearth must not map a host file a VMM linked in its place).
#[test]
fn a_memory_file_behind_a_link_is_not_mapped() {
    let dir = std::env::temp_dir().join(format!("hearth-uffd-link-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("real"), vec![1u8; 4096]).unwrap();
    assert_eq!(Memory::open(&dir.join("real")).unwrap().len(), 4096);
    std::os::unix::fs::symlink(dir.join("real"), dir.join("fc.mem")).unwrap();
    assert!(Memory::open(&dir.join("fc.mem")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
