/* Out-of-line wrappers for libfabric's static inline calls; see shim.h. */
#include "shim.h"

uint32_t kvxfer_fi_version_make(uint32_t major, uint32_t minor) { return FI_VERSION(major, minor); }
struct fi_info *kvxfer_fi_allocinfo(void) { return fi_allocinfo(); }
int kvxfer_fi_close(struct fid *fid) { return fi_close(fid); }
int kvxfer_fi_fabric(struct fi_fabric_attr *attr, struct fid_fabric **fabric, void *context)
{
	return fi_fabric(attr, fabric, context);
}
int kvxfer_fi_domain(struct fid_fabric *fabric, struct fi_info *info, struct fid_domain **domain,
		     void *context)
{
	return fi_domain(fabric, info, domain, context);
}
int kvxfer_fi_endpoint(struct fid_domain *domain, struct fi_info *info, struct fid_ep **ep,
		       void *context)
{
	return fi_endpoint(domain, info, ep, context);
}
int kvxfer_fi_cq_open(struct fid_domain *domain, struct fi_cq_attr *attr, struct fid_cq **cq,
		      void *context)
{
	return fi_cq_open(domain, attr, cq, context);
}
int kvxfer_fi_av_open(struct fid_domain *domain, struct fi_av_attr *attr, struct fid_av **av,
		      void *context)
{
	return fi_av_open(domain, attr, av, context);
}
int kvxfer_fi_av_insert(struct fid_av *av, const void *addr, size_t count, fi_addr_t *fi_addr,
			uint64_t flags, void *context)
{
	return fi_av_insert(av, addr, count, fi_addr, flags, context);
}
int kvxfer_fi_av_remove(struct fid_av *av, fi_addr_t *fi_addr, size_t count, uint64_t flags)
{
	return fi_av_remove(av, fi_addr, count, flags);
}
const char *kvxfer_fi_av_straddr(struct fid_av *av, const void *addr, char *buf, size_t *len)
{
	return fi_av_straddr(av, addr, buf, len);
}
int kvxfer_fi_ep_bind(struct fid_ep *ep, struct fid *bfid, uint64_t flags)
{
	return fi_ep_bind(ep, bfid, flags);
}
int kvxfer_fi_enable(struct fid_ep *ep) { return fi_enable(ep); }
int kvxfer_fi_getname(fid_t fid, void *addr, size_t *addrlen) { return fi_getname(fid, addr, addrlen); }
int kvxfer_fi_mr_reg(struct fid_domain *domain, const void *buf, size_t len, uint64_t access,
		     uint64_t offset, uint64_t requested_key, uint64_t flags, struct fid_mr **mr,
		     void *context)
{
	return fi_mr_reg(domain, buf, len, access, offset, requested_key, flags, mr, context);
}
int kvxfer_fi_mr_regattr(struct fid_domain *domain, const struct fi_mr_attr *attr, uint64_t flags,
			 struct fid_mr **mr)
{
	return fi_mr_regattr(domain, attr, flags, mr);
}
int kvxfer_fi_mr_reg_cuda(struct fid_domain *domain, const void *buf, size_t len, uint64_t access,
			  uint64_t requested_key, int device, struct fid_mr **mr)
{
	struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
	struct fi_mr_attr attr = { 0 };

	attr.mr_iov = &iov;
	attr.iov_count = 1;
	attr.access = access;
	attr.requested_key = requested_key;
	attr.iface = FI_HMEM_CUDA;
	attr.device.cuda = device;
	/* Not FI_HMEM_DEVICE_ONLY: with it, libfabric 2.1's shm moves VRAM by
	 * CUDA IPC and reports RMA complete before the copy has landed (a
	 * 100-byte READ read zeros; 64 MiB "completed" at 12,000 GB/s). */
	return fi_mr_regattr(domain, &attr, 0, mr);
}
uint64_t kvxfer_fi_mr_key(struct fid_mr *mr) { return fi_mr_key(mr); }
void *kvxfer_fi_mr_desc(struct fid_mr *mr) { return fi_mr_desc(mr); }
int kvxfer_fi_mr_bind(struct fid_mr *mr, struct fid *bfid, uint64_t flags)
{
	return fi_mr_bind(mr, bfid, flags);
}
int kvxfer_fi_mr_enable(struct fid_mr *mr) { return fi_mr_enable(mr); }
ssize_t kvxfer_fi_write(struct fid_ep *ep, const void *buf, size_t len, void *desc,
			fi_addr_t dest_addr, uint64_t addr, uint64_t key, void *context)
{
	return fi_write(ep, buf, len, desc, dest_addr, addr, key, context);
}
ssize_t kvxfer_fi_writemsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags)
{
	return fi_writemsg(ep, msg, flags);
}
ssize_t kvxfer_fi_read(struct fid_ep *ep, void *buf, size_t len, void *desc, fi_addr_t src_addr,
		       uint64_t addr, uint64_t key, void *context)
{
	return fi_read(ep, buf, len, desc, src_addr, addr, key, context);
}
ssize_t kvxfer_fi_readmsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags)
{
	return fi_readmsg(ep, msg, flags);
}
ssize_t kvxfer_fi_send(struct fid_ep *ep, const void *buf, size_t len, void *desc,
		       fi_addr_t dest_addr, void *context)
{
	return fi_send(ep, buf, len, desc, dest_addr, context);
}
ssize_t kvxfer_fi_senddata(struct fid_ep *ep, const void *buf, size_t len, void *desc,
			   uint64_t data, fi_addr_t dest_addr, void *context)
{
	return fi_senddata(ep, buf, len, desc, data, dest_addr, context);
}
ssize_t kvxfer_fi_recv(struct fid_ep *ep, void *buf, size_t len, void *desc, fi_addr_t src_addr,
		       void *context)
{
	return fi_recv(ep, buf, len, desc, src_addr, context);
}
ssize_t kvxfer_fi_cancel(fid_t fid, void *context) { return fi_cancel(fid, context); }
ssize_t kvxfer_fi_cq_read(struct fid_cq *cq, void *buf, size_t count) { return fi_cq_read(cq, buf, count); }
ssize_t kvxfer_fi_cq_readerr(struct fid_cq *cq, struct fi_cq_err_entry *buf, uint64_t flags)
{
	return fi_cq_readerr(cq, buf, flags);
}
const char *kvxfer_fi_cq_strerror(struct fid_cq *cq, int prov_errno, const void *err_data,
				  char *buf, size_t len)
{
	return fi_cq_strerror(cq, prov_errno, err_data, buf, len);
}
int kvxfer_fi_cq_wait_fd(struct fid_cq *cq, int *fd) { return fi_control(&cq->fid, FI_GETWAIT, fd); }
int kvxfer_fi_trywait_cq(struct fid_fabric *fabric, struct fid_cq *cq)
{
	struct fid *fids[1] = { &cq->fid };
	return fi_trywait(fabric, fids, 1);
}
