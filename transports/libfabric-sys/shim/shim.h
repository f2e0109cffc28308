/*
 * Out-of-line wrappers for libfabric's static inline calls, so that they can
 * be called from Rust. Each kvxfer_fi_X forwards to fi_X unchanged.
 */
#ifndef KVXFER_FI_SHIM_H
#define KVXFER_FI_SHIM_H

#include <rdma/fabric.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_rma.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_errno.h>

uint32_t kvxfer_fi_version_make(uint32_t major, uint32_t minor);
struct fi_info *kvxfer_fi_allocinfo(void);
int kvxfer_fi_close(struct fid *fid);
int kvxfer_fi_fabric(struct fi_fabric_attr *attr, struct fid_fabric **fabric, void *context);
int kvxfer_fi_domain(struct fid_fabric *fabric, struct fi_info *info, struct fid_domain **domain,
                     void *context);
int kvxfer_fi_endpoint(struct fid_domain *domain, struct fi_info *info, struct fid_ep **ep,
                       void *context);
int kvxfer_fi_cq_open(struct fid_domain *domain, struct fi_cq_attr *attr, struct fid_cq **cq,
                      void *context);
int kvxfer_fi_av_open(struct fid_domain *domain, struct fi_av_attr *attr, struct fid_av **av,
                      void *context);
int kvxfer_fi_av_insert(struct fid_av *av, const void *addr, size_t count, fi_addr_t *fi_addr,
                        uint64_t flags, void *context);
int kvxfer_fi_av_remove(struct fid_av *av, fi_addr_t *fi_addr, size_t count, uint64_t flags);
const char *kvxfer_fi_av_straddr(struct fid_av *av, const void *addr, char *buf, size_t *len);
int kvxfer_fi_ep_bind(struct fid_ep *ep, struct fid *bfid, uint64_t flags);
int kvxfer_fi_enable(struct fid_ep *ep);
int kvxfer_fi_getname(fid_t fid, void *addr, size_t *addrlen);
int kvxfer_fi_mr_reg(struct fid_domain *domain, const void *buf, size_t len, uint64_t access,
                     uint64_t offset, uint64_t requested_key, uint64_t flags, struct fid_mr **mr,
                     void *context);
int kvxfer_fi_mr_regattr(struct fid_domain *domain, const struct fi_mr_attr *attr, uint64_t flags,
                         struct fid_mr **mr);
/*
 * Registers [buf, buf+len) of CUDA device `device` (fi_mr_regattr with
 * iface FI_HMEM_CUDA): the provider moves that VRAM itself. Fails with the
 * provider's code where it has no CUDA support (built without it, or
 * FI_HMEM not granted).
 */
int kvxfer_fi_mr_reg_cuda(struct fid_domain *domain, const void *buf, size_t len, uint64_t access,
                          uint64_t requested_key, int device, struct fid_mr **mr);
uint64_t kvxfer_fi_mr_key(struct fid_mr *mr);
void *kvxfer_fi_mr_desc(struct fid_mr *mr);
int kvxfer_fi_mr_bind(struct fid_mr *mr, struct fid *bfid, uint64_t flags);
int kvxfer_fi_mr_enable(struct fid_mr *mr);
ssize_t kvxfer_fi_write(struct fid_ep *ep, const void *buf, size_t len, void *desc,
                        fi_addr_t dest_addr, uint64_t addr, uint64_t key, void *context);
ssize_t kvxfer_fi_writemsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags);
ssize_t kvxfer_fi_read(struct fid_ep *ep, void *buf, size_t len, void *desc, fi_addr_t src_addr,
                       uint64_t addr, uint64_t key, void *context);
ssize_t kvxfer_fi_readmsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags);
ssize_t kvxfer_fi_send(struct fid_ep *ep, const void *buf, size_t len, void *desc,
                       fi_addr_t dest_addr, void *context);
ssize_t kvxfer_fi_senddata(struct fid_ep *ep, const void *buf, size_t len, void *desc,
                           uint64_t data, fi_addr_t dest_addr, void *context);
ssize_t kvxfer_fi_recv(struct fid_ep *ep, void *buf, size_t len, void *desc, fi_addr_t src_addr,
                       void *context);
ssize_t kvxfer_fi_cancel(fid_t fid, void *context);
/* The file descriptor of a CQ opened with FI_WAIT_FD (fi_control FI_GETWAIT). */
int kvxfer_fi_cq_wait_fd(struct fid_cq *cq, int *fd);
/* fi_trywait on one CQ: 0 when the caller may block on its descriptor. */
int kvxfer_fi_trywait_cq(struct fid_fabric *fabric, struct fid_cq *cq);
ssize_t kvxfer_fi_cq_read(struct fid_cq *cq, void *buf, size_t count);
ssize_t kvxfer_fi_cq_readerr(struct fid_cq *cq, struct fi_cq_err_entry *buf, uint64_t flags);
const char *kvxfer_fi_cq_strerror(struct fid_cq *cq, int prov_errno, const void *err_data,
                                  char *buf, size_t len);

#endif
