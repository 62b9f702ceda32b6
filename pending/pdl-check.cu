// A standalone check of kernels/pdl.cuh on a GPU (pending/pdl-chain.patch): whether PDL turns on
// (ptxVersion of sm_90a code), whether a PDL launch on the legacy stream is accepted, and what a
// ten-kernel chain replayed from a graph costs per kernel with and without it; a dependent that
// ran ahead would lose increments ("wrong" > 0). With the patch applied, from the repo root:
//   nvcc -std=c++17 -O3 -Ikernels -gencode arch=compute_90a,code=sm_90a pending/pdl-check.cu -o pdl-check
//   REMOE_PDL=1 ./pdl-check; REMOE_PDL=0 ./pdl-check
#include "pdl.cuh"
#include <cstdio>
__global__ void k(float*p,int n){pdl_enter();int i=blockIdx.x*blockDim.x+threadIdx.x;if(i<n)p[i]+=1.f;}
int main(){int n=4096,L=10,R=2000;float*p;cudaMalloc(&p,n*4);cudaMemset(p,0,n*4);
cudaFuncAttributes a;cudaFuncGetAttributes(&a,(const void*)k);
printf("ptxVersion %d binaryVersion %d pdl_enabled %d\n",a.ptxVersion,a.binaryVersion,(int)pdl_enabled((const void*)k));
launch_kernel(k,16,256,0,0,p,n);printf("legacy-stream launch: %s\n",cudaGetErrorString(cudaDeviceSynchronize()));
cudaStream_t s;cudaStreamCreateWithFlags(&s,cudaStreamNonBlocking);cudaGraph_t g;cudaGraphExec_t x;
cudaStreamBeginCapture(s,cudaStreamCaptureModeThreadLocal);for(int j=0;j<L;++j)launch_kernel(k,16,256,0,s,p,n);
printf("capture: %s\n",cudaGetErrorString(cudaStreamEndCapture(s,&g)));cudaGraphInstantiate(&x,g,0);
for(int j=0;j<50;++j)cudaGraphLaunch(x,s);cudaEvent_t e0,e1;cudaEventCreate(&e0);cudaEventCreate(&e1);
cudaEventRecord(e0,s);for(int j=0;j<R;++j)cudaGraphLaunch(x,s);cudaEventRecord(e1,s);cudaEventSynchronize(e1);float ms;cudaEventElapsedTime(&ms,e0,e1);
float h[4096];cudaMemcpy(h,p,n*4,cudaMemcpyDeviceToHost);int bad=0;for(int i=0;i<n;++i)if(h[i]!=(float)(1+(50+R)*L))bad++;
printf("chain of %d: %.3f us per replay, %.3f us per kernel; err %s, wrong %d\n",L,ms*1e3/R,ms*1e3/R/L,cudaGetErrorString(cudaGetLastError()),bad);}
