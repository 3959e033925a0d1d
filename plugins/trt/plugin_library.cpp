// Entry points of the plugin shared library, for IPluginRegistry::loadLibrary and
// `trtexec --dynamicPlugins=libawq_edge_trt_plugins.so`.
#include <NvInferRuntime.h>

#include "awq_attention_plugin.h"
#include "awq_matmul_plugin.h"
#include "plugin_common.h"

extern "C" TENSORRTAPI void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { awq_edge::setLoggerFinder(finder); }

extern "C" TENSORRTAPI nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static awq_edge::AwqMatMulCreator awqMatMulCreator;
    static awq_edge::AwqAttentionCreator awqAttentionCreator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&awqMatMulCreator, &awqAttentionCreator};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}
