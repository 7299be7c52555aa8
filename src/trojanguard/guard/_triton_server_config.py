"""Triton Inference Server's model configuration schema (``inference.ModelConfig``, ``model_config.proto``), as the
serialized file descriptor generated from it — taken unchanged from the ``tritonclient`` 2.73.0 wheel
(``tritonclient/grpc/model_config_pb2.py``), so that ``config.pbtxt`` files are parsed against Triton's own
schema without installing ``tritonclient`` (whose gRPC extra pins an older protobuf).

The descriptor is loaded into a private descriptor pool, never the default one, so it cannot clash with a
``tritonclient`` imported by the same process. Its licence (BSD-3-Clause):

    # Copyright (c) 2020, NVIDIA CORPORATION. All rights reserved.
    #
    # Redistribution and use in source and binary forms, with or without
    # modification, are permitted provided that the following conditions
    # are met:
    #  * Redistributions of source code must retain the above copyright
    #    notice, this list of conditions and the following disclaimer.
    #  * Redistributions in binary form must reproduce the above copyright
    #    notice, this list of conditions and the following disclaimer in the
    #    documentation and/or other materials provided with the distribution.
    #  * Neither the name of NVIDIA CORPORATION nor the names of its
    #    contributors may be used to endorse or promote products derived
    #    from this software without specific prior written permission.
    #
    # THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS ``AS IS'' AND ANY
    # EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
    # IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR
    # PURPOSE ARE DISCLAIMED.  IN NO EVENT SHALL THE COPYRIGHT OWNER OR
    # CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
    # EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
    # PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR
    # PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY
    # OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT
    # (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
    # OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""

from __future__ import annotations

import functools

SOURCE = "tritonclient 2.73.0, model_config.proto"
SERIALIZED_DESCRIPTOR = b"".join((
    b'\n\x12model_config.proto\x12\tinference"\x96\x01\n\x10ModelRateLimiter\x127\n\treso',
    b'urces\x18\x01 \x03(\x0b2$.inference.ModelRateLimiter.Resource\x12\x10\n\x08priorit',
    b'y\x18\x02 \x01(\r\x1a7\n\x08Resource\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x0e\n\x06global\x18\x02 \x01(\x08\x12\r\n\x05count\x18\x03',
    b' \x01(\r"\x87\x04\n\x12ModelInstanceGroup\x12\x0c\n\x04name\x18\x01 \x01(\t\x120\n\x04kind\x18\x04 \x01(\x0e2".in',
    b'ference.ModelInstanceGroup.Kind\x12\r\n\x05count\x18\x02 \x01(\x05\x121\n\x0crate_limit',
    b'er\x18\x06 \x01(\x0b2\x1b.inference.ModelRateLimiter\x12\x0c\n\x04gpus\x18\x03 \x03(\x05\x12H\n\x11secon',
    b'dary_devices\x18\x08 \x03(\x0b2-.inference.ModelInstanceGroup.SecondaryD',
    b'evice\x12\x0f\n\x07profile\x18\x05 \x03(\t\x12\x0f\n\x07passive\x18\x07 \x01(\x08\x12\x13\n\x0bhost_policy\x18\t \x01(\t',
    b'\x1a\x9c\x01\n\x0fSecondaryDevice\x12O\n\x04kind\x18\x01 \x01(\x0e2A.inference.ModelInstance',
    b'Group.SecondaryDevice.SecondaryDeviceKind\x12\x11\n\tdevice_id\x18\x02 \x01(\x03',
    b'"%\n\x13SecondaryDeviceKind\x12\x0e\n\nKIND_NVDLA\x10\x00"A\n\x04Kind\x12\r\n\tKIND_AUTO',
    b'\x10\x00\x12\x0c\n\x08KIND_GPU\x10\x01\x12\x0c\n\x08KIND_CPU\x10\x02\x12\x0e\n\nKIND_MODEL\x10\x03"#\n\x12ModelTenso',
    b'rReshape\x12\r\n\x05shape\x18\x01 \x03(\x03"\xd3\x02\n\nModelInput\x12\x0c\n\x04name\x18\x01 \x01(\t\x12&\n\tdata',
    b'_type\x18\x02 \x01(\x0e2\x13.inference.DataType\x12,\n\x06format\x18\x03 \x01(\x0e2\x1c.inference',
    b'.ModelInput.Format\x12\x0c\n\x04dims\x18\x04 \x03(\x03\x12.\n\x07reshape\x18\x05 \x01(\x0b2\x1d.inferenc',
    b'e.ModelTensorReshape\x12\x17\n\x0fis_shape_tensor\x18\x06 \x01(\x08\x12\x1a\n\x12allow_ragge',
    b'd_batch\x18\x07 \x01(\x08\x12\x10\n\x08optional\x18\x08 \x01(\x08\x12\x1f\n\x17is_non_linear_format_io\x18\t',
    b' \x01(\x08";\n\x06Format\x12\x0f\n\x0bFORMAT_NONE\x10\x00\x12\x0f\n\x0bFORMAT_NHWC\x10\x01\x12\x0f\n\x0bFORMAT_N',
    b'CHW\x10\x02"\xd3\x01\n\x0bModelOutput\x12\x0c\n\x04name\x18\x01 \x01(\t\x12&\n\tdata_type\x18\x02 \x01(\x0e2\x13.inf',
    b'erence.DataType\x12\x0c\n\x04dims\x18\x03 \x03(\x03\x12.\n\x07reshape\x18\x05 \x01(\x0b2\x1d.inference.M',
    b'odelTensorReshape\x12\x16\n\x0elabel_filename\x18\x04 \x01(\t\x12\x17\n\x0fis_shape_tensor',
    b'\x18\x06 \x01(\x08\x12\x1f\n\x17is_non_linear_format_io\x18\x07 \x01(\x08"\xd9\x02\n\nBatchInput\x12(\n\x04ki',
    b'nd\x18\x01 \x01(\x0e2\x1a.inference.BatchInput.Kind\x12\x13\n\x0btarget_name\x18\x02 \x03(\t\x12&\n',
    b'\tdata_type\x18\x03 \x01(\x0e2\x13.inference.DataType\x12\x14\n\x0csource_input\x18\x04 \x03(\t"',
    b'\xcd\x01\n\x04Kind\x12\x17\n\x13BATCH_ELEMENT_COUNT\x10\x00\x12#\n\x1fBATCH_ACCUMULATED_ELEME',
    b'NT_COUNT\x10\x01\x12-\n)BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO\x10\x02\x12$\n',
    b' BATCH_MAX_ELEMENT_COUNT_AS_SHAPE\x10\x03\x12\x14\n\x10BATCH_ITEM_SHAPE\x10\x04\x12\x1c\n',
    b'\x18BATCH_ITEM_SHAPE_FLATTEN\x10\x05"\x8f\x01\n\x0bBatchOutput\x12\x13\n\x0btarget_name\x18\x01',
    b' \x03(\t\x12)\n\x04kind\x18\x02 \x01(\x0e2\x1b.inference.BatchOutput.Kind\x12\x14\n\x0csource_in',
    b'put\x18\x03 \x03(\t"*\n\x04Kind\x12"\n\x1eBATCH_SCATTER_WITH_INPUT_SHAPE\x10\x00"\x90\x02\n\x12Mo',
    b'delVersionPolicy\x126\n\x06latest\x18\x01 \x01(\x0b2$.inference.ModelVersionPol',
    b'icy.LatestH\x00\x120\n\x03all\x18\x02 \x01(\x0b2!.inference.ModelVersionPolicy.All',
    b'H\x00\x12:\n\x08specific\x18\x03 \x01(\x0b2&.inference.ModelVersionPolicy.Specific',
    b'H\x00\x1a\x1e\n\x06Latest\x12\x14\n\x0cnum_versions\x18\x01 \x01(\r\x1a\x05\n\x03All\x1a\x1c\n\x08Specific\x12\x10\n\x08ver',
    b'sions\x18\x01 \x03(\x03B\x0f\n\rpolicy_choice"\xfd\r\n\x17ModelOptimizationPolicy\x127\n\x05',
    b'graph\x18\x01 \x01(\x0b2(.inference.ModelOptimizationPolicy.Graph\x12B\n\x08pri',
    b'ority\x18\x02 \x01(\x0e20.inference.ModelOptimizationPolicy.ModelPriorit',
    b"y\x125\n\x04cuda\x18\x03 \x01(\x0b2'.inference.ModelOptimizationPolicy.Cuda\x12X\n\x16",
    b'execution_accelerators\x18\x04 \x01(\x0b28.inference.ModelOptimizationPo',
    b'licy.ExecutionAccelerators\x12R\n\x13input_pinned_memory\x18\x05 \x01(\x0b25.in',
    b'ference.ModelOptimizationPolicy.PinnedMemoryBuffer\x12S\n\x14output',
    b'_pinned_memory\x18\x06 \x01(\x0b25.inference.ModelOptimizationPolicy.Pin',
    b'nedMemoryBuffer\x12&\n\x1egather_kernel_buffer_threshold\x18\x07 \x01(\r\x12\x16\n\x0ee',
    b'ager_batching\x18\x08 \x01(\x08\x1a\x16\n\x05Graph\x12\r\n\x05level\x18\x01 \x01(\x05\x1a\xba\x05\n\x04Cuda\x12\x0e\n\x06grap',
    b'hs\x18\x01 \x01(\x08\x12\x18\n\x10busy_wait_events\x18\x02 \x01(\x08\x12E\n\ngraph_spec\x18\x03 \x03(\x0b21.inf',
    b'erence.ModelOptimizationPolicy.Cuda.GraphSpec\x12\x1a\n\x12output_copy',
    b'_stream\x18\x04 \x01(\x08\x1a\xa4\x04\n\tGraphSpec\x12\x12\n\nbatch_size\x18\x01 \x01(\x05\x12K\n\x05input\x18\x02 \x03',
    b'(\x0b2<.inference.ModelOptimizationPolicy.Cuda.GraphSpec.InputE',
    b'ntry\x12W\n\x11graph_lower_bound\x18\x03 \x01(\x0b2<.inference.ModelOptimizatio',
    b'nPolicy.Cuda.GraphSpec.LowerBound\x1a\x14\n\x05Shape\x12\x0b\n\x03dim\x18\x01 \x03(\x03\x1a\xdf\x01\n\n',
    b'LowerBound\x12\x12\n\nbatch_size\x18\x01 \x01(\x05\x12V\n\x05input\x18\x02 \x03(\x0b2G.inference.Mo',
    b'delOptimizationPolicy.Cuda.GraphSpec.LowerBound.InputEntry\x1ae',
    b'\n\nInputEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12F\n\x05value\x18\x02 \x01(\x0b27.inference.ModelOp',
    b'timizationPolicy.Cuda.GraphSpec.Shape:\x028\x01\x1ae\n\nInputEntry\x12\x0b\n\x03k',
    b'ey\x18\x01 \x01(\t\x12F\n\x05value\x18\x02 \x01(\x0b27.inference.ModelOptimizationPolicy.',
    b'Cuda.GraphSpec.Shape:\x028\x01\x1a\xa4\x03\n\x15ExecutionAccelerators\x12g\n\x19gpu_ex',
    b'ecution_accelerator\x18\x01 \x03(\x0b2D.inference.ModelOptimizationPolic',
    b'y.ExecutionAccelerators.Accelerator\x12g\n\x19cpu_execution_acceler',
    b'ator\x18\x02 \x03(\x0b2D.inference.ModelOptimizationPolicy.ExecutionAcce',
    b'lerators.Accelerator\x1a\xb8\x01\n\x0bAccelerator\x12\x0c\n\x04name\x18\x01 \x01(\t\x12h\n\nparame',
    b'ters\x18\x02 \x03(\x0b2T.inference.ModelOptimizationPolicy.ExecutionAcce',
    b'lerators.Accelerator.ParametersEntry\x1a1\n\x0fParametersEntry\x12\x0b\n\x03k',
    b'ey\x18\x01 \x01(\t\x12\r\n\x05value\x18\x02 \x01(\t:\x028\x01\x1a$\n\x12PinnedMemoryBuffer\x12\x0e\n\x06enable\x18',
    b'\x01 \x01(\x08"I\n\rModelPriority\x12\x14\n\x10PRIORITY_DEFAULT\x10\x00\x12\x10\n\x0cPRIORITY_MAX',
    b'\x10\x01\x12\x10\n\x0cPRIORITY_MIN\x10\x02"\xdb\x01\n\x10ModelQueuePolicy\x12A\n\x0etimeout_action\x18',
    b'\x01 \x01(\x0e2).inference.ModelQueuePolicy.TimeoutAction\x12$\n\x1cdefault_',
    b'timeout_microseconds\x18\x02 \x01(\x04\x12\x1e\n\x16allow_timeout_override\x18\x03 \x01(\x08\x12\x16',
    b'\n\x0emax_queue_size\x18\x04 \x01(\r"&\n\rTimeoutAction\x12\n\n\x06REJECT\x10\x00\x12\t\n\x05DELAY',
    b'\x10\x01"\x9b\x03\n\x14ModelDynamicBatching\x12\x1c\n\x14preferred_batch_size\x18\x01 \x03(\x05\x12$\n',
    b'\x1cmax_queue_delay_microseconds\x18\x02 \x01(\x04\x12\x19\n\x11preserve_ordering\x18\x03 \x01',
    b'(\x08\x12\x17\n\x0fpriority_levels\x18\x04 \x01(\x04\x12\x1e\n\x16default_priority_level\x18\x05 \x01(\x04\x12',
    b'9\n\x14default_queue_policy\x18\x06 \x01(\x0b2\x1b.inference.ModelQueuePolicy\x12W',
    b'\n\x15priority_queue_policy\x18\x07 \x03(\x0b28.inference.ModelDynamicBatchi',
    b'ng.PriorityQueuePolicyEntry\x1aW\n\x18PriorityQueuePolicyEntry\x12\x0b\n\x03k',
    b'ey\x18\x01 \x01(\x04\x12*\n\x05value\x18\x02 \x01(\x0b2\x1b.inference.ModelQueuePolicy:\x028\x01"\xee\n\n',
    b'\x15ModelSequenceBatching\x12A\n\x06direct\x18\x03 \x01(\x0b2/.inference.ModelSequ',
    b'enceBatching.StrategyDirectH\x00\x12A\n\x06oldest\x18\x04 \x01(\x0b2/.inference.Mo',
    b'delSequenceBatching.StrategyOldestH\x00\x12&\n\x1emax_sequence_idle_mi',
    b'croseconds\x18\x01 \x01(\x04\x12D\n\rcontrol_input\x18\x02 \x03(\x0b2-.inference.ModelSeq',
    b'uenceBatching.ControlInput\x125\n\x05state\x18\x05 \x03(\x0b2&.inference.ModelS',
    b'equenceBatching.State\x12\x1a\n\x12iterative_sequence\x18\x06 \x01(\x08\x1a\xb1\x02\n\x07Contro',
    b'l\x12;\n\x04kind\x18\x01 \x01(\x0e2-.inference.ModelSequenceBatching.Control.Ki',
    b'nd\x12\x18\n\x10int32_false_true\x18\x02 \x03(\x05\x12\x17\n\x0ffp32_false_true\x18\x03 \x03(\x02\x12\x17\n\x0fboo',
    b'l_false_true\x18\x05 \x03(\x08\x12&\n\tdata_type\x18\x04 \x01(\x0e2\x13.inference.DataType"u',
    b'\n\x04Kind\x12\x1a\n\x16CONTROL_SEQUENCE_START\x10\x00\x12\x1a\n\x16CONTROL_SEQUENCE_READY',
    b'\x10\x01\x12\x18\n\x14CONTROL_SEQUENCE_END\x10\x02\x12\x1b\n\x17CONTROL_SEQUENCE_CORRID\x10\x03\x1aW\n',
    b'\x0cControlInput\x12\x0c\n\x04name\x18\x01 \x01(\t\x129\n\x07control\x18\x02 \x03(\x0b2(.inference.Mod',
    b'elSequenceBatching.Control\x1a\x8a\x01\n\x0cInitialState\x12&\n\tdata_type\x18\x01 \x01',
    b'(\x0e2\x13.inference.DataType\x12\x0c\n\x04dims\x18\x02 \x03(\x03\x12\x13\n\tzero_data\x18\x03 \x01(\x08H\x00\x12\x13',
    b'\n\tdata_file\x18\x04 \x01(\tH\x00\x12\x0c\n\x04name\x18\x05 \x01(\tB\x0c\n\nstate_data\x1a\xf3\x01\n\x05State\x12\x12\n',
    b'\ninput_name\x18\x01 \x01(\t\x12\x13\n\x0boutput_name\x18\x02 \x01(\t\x12&\n\tdata_type\x18\x03 \x01(\x0e2\x13.',
    b'inference.DataType\x12\x0c\n\x04dims\x18\x04 \x03(\x03\x12D\n\rinitial_state\x18\x05 \x03(\x0b2-.in',
    b'ference.ModelSequenceBatching.InitialState\x12(\n use_same_buffe',
    b'r_for_input_output\x18\x06 \x01(\x08\x12\x1b\n\x13use_growable_memory\x18\x07 \x01(\x08\x1aX\n\x0eStr',
    b'ategyDirect\x12$\n\x1cmax_queue_delay_microseconds\x18\x01 \x01(\x04\x12 \n\x18minimum',
    b'_slot_utilization\x18\x02 \x01(\x02\x1a\x90\x01\n\x0eStrategyOldest\x12\x1f\n\x17max_candidate_',
    b'sequences\x18\x01 \x01(\x05\x12\x1c\n\x14preferred_batch_size\x18\x02 \x03(\x05\x12$\n\x1cmax_queue_d',
    b'elay_microseconds\x18\x03 \x01(\x04\x12\x19\n\x11preserve_ordering\x18\x04 \x01(\x08B\x11\n\x0fstrate',
    b'gy_choice"\x95\x03\n\x0fModelEnsembling\x12-\n\x04step\x18\x01 \x03(\x0b2\x1f.inference.Mode',
    b'lEnsembling.Step\x12\x1d\n\x15max_inflight_requests\x18\x02 \x01(\r\x1a\xb3\x02\n\x04Step\x12\x12\n\n',
    b'model_name\x18\x01 \x01(\t\x12\x15\n\rmodel_version\x18\x02 \x01(\x03\x12@\n\tinput_map\x18\x03 \x03(\x0b2-',
    b'.inference.ModelEnsembling.Step.InputMapEntry\x12B\n\noutput_map\x18',
    b'\x04 \x03(\x0b2..inference.ModelEnsembling.Step.OutputMapEntry\x12\x17\n\x0fmod',
    b'el_namespace\x18\x05 \x01(\t\x1a/\n\rInputMapEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12\r\n\x05value\x18\x02 ',
    b'\x01(\t:\x028\x01\x1a0\n\x0eOutputMapEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12\r\n\x05value\x18\x02 \x01(\t:\x028\x01"&\n',
    b'\x0eModelParameter\x12\x14\n\x0cstring_value\x18\x01 \x01(\t"\xd9\x02\n\x0bModelWarmup\x12\x0c\n\x04nam',
    b'e\x18\x01 \x01(\t\x12\x12\n\nbatch_size\x18\x02 \x01(\r\x122\n\x06inputs\x18\x03 \x03(\x0b2".inference.Mode',
    b'lWarmup.InputsEntry\x12\r\n\x05count\x18\x04 \x01(\r\x1a\x97\x01\n\x05Input\x12&\n\tdata_type\x18\x01 ',
    b'\x01(\x0e2\x13.inference.DataType\x12\x0c\n\x04dims\x18\x02 \x03(\x03\x12\x13\n\tzero_data\x18\x03 \x01(\x08H\x00\x12',
    b'\x15\n\x0brandom_data\x18\x04 \x01(\x08H\x00\x12\x19\n\x0finput_data_file\x18\x05 \x01(\tH\x00B\x11\n\x0finput_d',
    b'ata_type\x1aK\n\x0bInputsEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12+\n\x05value\x18\x02 \x01(\x0b2\x1c.infere',
    b'nce.ModelWarmup.Input:\x028\x01".\n\x0fModelOperations\x12\x1b\n\x13op_library_f',
    b'ilename\x18\x01 \x03(\t"+\n\x16ModelTransactionPolicy\x12\x11\n\tdecoupled\x18\x01 \x01(\x08"\xe6',
    b'\x01\n\x15ModelRepositoryAgents\x126\n\x06agents\x18\x01 \x03(\x0b2&.inference.ModelRe',
    b'positoryAgents.Agent\x1a\x94\x01\n\x05Agent\x12\x0c\n\x04name\x18\x01 \x01(\t\x12J\n\nparameters\x18\x02',
    b' \x03(\x0b26.inference.ModelRepositoryAgents.Agent.ParametersEntry',
    b'\x1a1\n\x0fParametersEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12\r\n\x05value\x18\x02 \x01(\t:\x028\x01"$\n\x12Model',
    b'ResponseCache\x12\x0e\n\x06enable\x18\x01 \x01(\x08"\xe2\x02\n\x0cModelMetrics\x12=\n\x0emetric_con',
    b'trol\x18\x01 \x03(\x0b2%.inference.ModelMetrics.MetricControl\x1a\x92\x02\n\rMetric',
    b'Control\x12Q\n\x11metric_identifier\x18\x01 \x01(\x0b26.inference.ModelMetrics.',
    b'MetricControl.MetricIdentifier\x12S\n\x11histogram_options\x18\x02 \x01(\x0b26.',
    b'inference.ModelMetrics.MetricControl.HistogramOptionsH\x00\x1a"\n\x10M',
    b'etricIdentifier\x12\x0e\n\x06family\x18\x01 \x01(\t\x1a#\n\x10HistogramOptions\x12\x0f\n\x07bucke',
    b'ts\x18\x01 \x03(\x01B\x10\n\x0emetric_options"\xf3\n\n\x0bModelConfig\x12\x0c\n\x04name\x18\x01 \x01(\t\x12\x10\n\x08',
    b'platform\x18\x02 \x01(\t\x12\x0f\n\x07backend\x18\x11 \x01(\t\x12\x0f\n\x07runtime\x18\x19 \x01(\t\x125\n\x0eversion_',
    b'policy\x18\x03 \x01(\x0b2\x1d.inference.ModelVersionPolicy\x12\x16\n\x0emax_batch_siz',
    b'e\x18\x04 \x01(\x05\x12$\n\x05input\x18\x05 \x03(\x0b2\x15.inference.ModelInput\x12&\n\x06output\x18\x06 \x03(',
    b'\x0b2\x16.inference.ModelOutput\x12*\n\x0bbatch_input\x18\x14 \x03(\x0b2\x15.inference.B',
    b'atchInput\x12,\n\x0cbatch_output\x18\x15 \x03(\x0b2\x16.inference.BatchOutput\x128\n\x0co',
    b'ptimization\x18\x0c \x01(\x0b2".inference.ModelOptimizationPolicy\x12;\n\x10dyn',
    b'amic_batching\x18\x0b \x01(\x0b2\x1f.inference.ModelDynamicBatchingH\x00\x12=\n\x11se',
    b'quence_batching\x18\r \x01(\x0b2 .inference.ModelSequenceBatchingH\x00\x129\n',
    b'\x13ensemble_scheduling\x18\x0f \x01(\x0b2\x1a.inference.ModelEnsemblingH\x00\x125\n\x0e',
    b'instance_group\x18\x07 \x03(\x0b2\x1d.inference.ModelInstanceGroup\x12\x1e\n\x16defau',
    b'lt_model_filename\x18\x08 \x01(\t\x12H\n\x12cc_model_filenames\x18\t \x03(\x0b2,.infere',
    b'nce.ModelConfig.CcModelFilenamesEntry\x12;\n\x0bmetric_tags\x18\n \x03(\x0b2&',
    b'.inference.ModelConfig.MetricTagsEntry\x12:\n\nparameters\x18\x0e \x03(\x0b2&',
    b'.inference.ModelConfig.ParametersEntry\x12,\n\x0cmodel_warmup\x18\x10 \x03(\x0b',
    b'2\x16.inference.ModelWarmup\x124\n\x10model_operations\x18\x12 \x01(\x0b2\x1a.inferen',
    b'ce.ModelOperations\x12C\n\x18model_transaction_policy\x18\x13 \x01(\x0b2!.infer',
    b'ence.ModelTransactionPolicy\x12A\n\x17model_repository_agents\x18\x17 \x01(\x0b',
    b'2 .inference.ModelRepositoryAgents\x125\n\x0eresponse_cache\x18\x18 \x01(\x0b2\x1d',
    b'.inference.ModelResponseCache\x12.\n\rmodel_metrics\x18\x1a \x01(\x0b2\x17.infer',
    b'ence.ModelMetrics\x1a7\n\x15CcModelFilenamesEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12\r\n\x05v',
    b'alue\x18\x02 \x01(\t:\x028\x01\x1a1\n\x0fMetricTagsEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12\r\n\x05value\x18\x02 \x01(',
    b'\t:\x028\x01\x1aL\n\x0fParametersEntry\x12\x0b\n\x03key\x18\x01 \x01(\t\x12(\n\x05value\x18\x02 \x01(\x0b2\x19.infer',
    b'ence.ModelParameter:\x028\x01B\x13\n\x11scheduling_choice*\xfa\x01\n\x08DataType\x12\x10\n',
    b'\x0cTYPE_INVALID\x10\x00\x12\r\n\tTYPE_BOOL\x10\x01\x12\x0e\n\nTYPE_UINT8\x10\x02\x12\x0f\n\x0bTYPE_UINT1',
    b'6\x10\x03\x12\x0f\n\x0bTYPE_UINT32\x10\x04\x12\x0f\n\x0bTYPE_UINT64\x10\x05\x12\r\n\tTYPE_INT8\x10\x06\x12\x0e\n\nTYPE',
    b'_INT16\x10\x07\x12\x0e\n\nTYPE_INT32\x10\x08\x12\x0e\n\nTYPE_INT64\x10\t\x12\r\n\tTYPE_FP16\x10\n\x12\r\n\tT',
    b'YPE_FP32\x10\x0b\x12\r\n\tTYPE_FP64\x10\x0c\x12\x0f\n\x0bTYPE_STRING\x10\r\x12\r\n\tTYPE_BF16\x10\x0eb\x06p',
    b'roto3',
))


@functools.cache
def model_config_class():
    """The generated message class of ``inference.ModelConfig`` (from a private descriptor pool)."""
    from google.protobuf import descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(SERIALIZED_DESCRIPTOR)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))
