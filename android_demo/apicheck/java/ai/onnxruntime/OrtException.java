// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in ONNX Runtime's Java API.
package ai.onnxruntime;

public class OrtException extends Exception {
    private OrtException() {} // thrown by ONNX Runtime, never by the shell
}
