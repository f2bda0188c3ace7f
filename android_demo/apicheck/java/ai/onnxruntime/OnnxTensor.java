// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in ONNX Runtime's Java API.
package ai.onnxruntime;

import java.nio.FloatBuffer;
import java.nio.IntBuffer;
import java.nio.LongBuffer;

public class OnnxTensor extends OnnxTensorLike {
    private OnnxTensor() {} // made by createTensor

    public static OnnxTensor createTensor(OrtEnvironment env, FloatBuffer data, long[] shape) throws OrtException {
        throw new UnsupportedOperationException("declaration only");
    }

    public static OnnxTensor createTensor(OrtEnvironment env, IntBuffer data, long[] shape) throws OrtException {
        throw new UnsupportedOperationException("declaration only");
    }

    public static OnnxTensor createTensor(OrtEnvironment env, LongBuffer data, long[] shape) throws OrtException {
        throw new UnsupportedOperationException("declaration only");
    }

    @Override
    public void close() {
        throw new UnsupportedOperationException("declaration only");
    }
}
