/*
 * hearth host <-> guest wire protocol, version 2 (HEARTH_PROTO_VERSION).
 *
 * One persistent byte stream per instance carries every frame in both
 * directions. The stream is a socketpair end or, for Node.js, a pair of
 * pipes (process backend), a virtio-serial port named "hearth.agent" (QEMU)
 * or an AF_VSOCK connection (Firecracker); the framing is identical on all.
 *
 * The language runtime speaks the same frames on its fd 3, so a runtime for
 * another language only has to speak this header. In the process backend
 * fd 3 is the host's channel itself (the agent's "direct mode": it hands the
 * channel over and stays off the request path, and a second socket carries
 * only the agent's LOG frames for raw stdout/stderr writes, untagged). When
 * fd 3 is a pipe, the runtime only reads it and writes its frames to fd 4,
 * the pipe back. In microVMs the agent relays between the port and a
 * socketpair to the runtime.
 *
 * The runtime sends console output as LOG frames tagged with the request it
 * belongs to, before that request's RESPONSE/ERROR.
 *
 * Frame layout (all integers little-endian):
 *
 *   struct hearth_frame_header   16 bytes
 *   meta                         meta_len bytes, UTF-8 JSON (an object; INVOKE: an
 *                                array, see below; meta_len may be 0)
 *   body                         body_len bytes, raw; never base64 on the wire
 *
 * A receiver that sees an unknown type, a bad magic or a length over the
 * limits below treats the stream as broken and closes it.
 */
#ifndef HEARTH_PROTOCOL_H
#define HEARTH_PROTOCOL_H

#include <stdint.h>

#define HEARTH_PROTO_MAGIC 0x4854u /* "HT" */
#define HEARTH_PROTO_VERSION 2u /* 2: INVOKE metadata positional */

/* Limits: a frame larger than this is a protocol error. */
#define HEARTH_META_MAX (1u << 20)         /* 1 MiB of JSON metadata        */
#define HEARTH_BODY_MAX (8u << 20)         /* 8 MiB of body (> 6 MiB payload) */
#define HEARTH_STREAM_CHUNK_MAX (64u << 10) /* body of one STREAM_CHUNK       */
#define HEARTH_STREAM_MAX (20u << 20)      /* all chunks of one streamed answer */
/* An idle instance (no INVOKE of it unanswered) may send only LOG frames of
   at most this size (output from a timer; cut bodies at 64 KiB). The host
   retires an idle instance at the header of any other or bigger frame. */
#define HEARTH_IDLE_FRAME_MAX 66576u       /* 16-byte header + 65 KiB */

enum hearth_frame_type {
    /* host -> guest */
    HEARTH_HELLO = 1,      /* meta: {"time_ms":<unix ms>,"handler":"app.handler",
                              "function":"<id>","task_root":"/var/task",
                              "memory_mb":128,"timeout_ms":30000,"env":{...},
                              "seed0".."seed3":<u64>}: the seeds are fresh host
                              randomness a VM agent mixes into its kernel RNG.
                              First frame after every (re)connect:
                              the agent sets the wall clock from time_ms; a runtime
                              that has not loaded the handler yet loads it now. */
    HEARTH_INVOKE = 2,     /* meta: [method, path, query, [[k,v],...], source_ip,
                              protocol, request_id, time_ms, domain, raw, deadline_ms]:
                              a JSON array in this order (cheaper to parse than an
                              object; runtimes also accept an object with these
                              names, "raw" then true/false); header names
                              lower-case, repeats as separate pairs; path is what
                              follows /f/<id>; time_ms and deadline_ms are unix ms;
                              raw 1: the body is the event itself (the service
                              API's Invoke), 0: an HTTP request; body: raw bytes.
                              deadline_ms is left out of an INVOKE sent to a Node
                              instance behind the one it runs (hearth's
                              "send ahead"): the runtime queues it and, when it
                              starts it, sets the deadline to that time plus the
                              function's timeout (HELLO's timeout_ms). */
    /* guest -> host */
    HEARTH_READY = 16,     /* meta: {"init_ms":<number>,"runtime":"node v20..."} */
    HEARTH_INIT_ERROR = 17,/* meta: {"errorType","errorMessage","stack"?} */
    HEARTH_RESPONSE = 18,  /* meta: {"status":200,"headers":[[k,v],...]}; body raw.
                              Set-Cookie values appear as repeated headers. */
    HEARTH_ERROR = 19,     /* meta: {"errorType","errorMessage"}: the handler threw
                              or returned a rejected promise for request_id. */
    HEARTH_LOG = 20,       /* body: one or more lines of output; request_id is the
                              request running when it was written (0: none);
                              flags: HEARTH_LOG_STDERR. */
    /* Streamed answers: instead of RESPONSE, a runtime may answer an INVOKE with
       STREAM_HEAD, any number of STREAM_CHUNKs and one STREAM_END, all with the
       invoke's request_id (LOG frames may come between them). The host sends
       each chunk on as it arrives, and stops reading the stream while the
       client is slow, so a runtime must expect its writes to block. */
    HEARTH_STREAM_HEAD = 21,  /* meta: as RESPONSE's {"status","headers"}; no body. */
    HEARTH_STREAM_CHUNK = 22, /* body: the next bytes, at most HEARTH_STREAM_CHUNK_MAX;
                                 over HEARTH_STREAM_MAX in all, the host ends the
                                 answer as failed and drops the rest. */
    HEARTH_STREAM_END = 23,   /* meta: {} (complete) or {"errorType","errorMessage"}
                                 (the handler failed mid-stream). An ERROR frame
                                 instead also ends the stream as failed. */
    HEARTH_EXIT = 24,         /* Runtime API served by hearth (process backend): the
                                 agent says its runtime exited; body: Lambda's words
                                 for the status ("Runtime exited with error: ..."). */
};

#define HEARTH_LOG_STDERR 0x01u

struct hearth_frame_header {
    uint16_t magic;       /* HEARTH_PROTO_MAGIC */
    uint8_t  type;        /* enum hearth_frame_type */
    uint8_t  flags;
    uint32_t request_id;  /* host-assigned, nonzero for INVOKE and its answer */
    uint32_t meta_len;
    uint32_t body_len;
};

#endif /* HEARTH_PROTOCOL_H */
